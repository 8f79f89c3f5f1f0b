"""train.py on a scaled-down SDXL and a tiny CelebA, run as a user runs it.

The SDXL is tests/tiny_sdxl.py's (random weights, real topology, 64x64 images -> 8x8 latents);
the data is six CelebA-format images with attribute and landmark tables (tests/test_data.py).
Runs that need a hook (a kill, a NaN, a look at the loaded model) call `train.main(argv)` in
this process; the others start `python train.py` / `torchrun` as a user would. Everything runs
on one CPU thread: the models are tiny, and several threads on a shared 2-core machine mostly wait
for each other.
"""

import hashlib
import json
import math
import os
import socket
import subprocess
import sys
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import data
import step
import train
from losses import LossConfig, cocoins_loss
from model.checkpoint import current_umask, read_metadata
from model.errors import UserError
from model.ddim import add_noise, alpha_bars, x0_from_eps
from model.checkpoint import load_mapper
from model.mapper import Mapper, MapperConfig, embedding_stats
from model.checkpoint import MISSING_WEIGHTS
from model.sdxl import SDXL
from tests.test_data import make_celeba
from tests.tiny_sdxl import save_tiny_sdxl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 64
LOG_KEYS = {"step", "loss", "l_con", "l_pos", "l_neg", "d_neg", "l_back", "l_spread", "lambda_neg", "gamma_scale",
            "grad_norm"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    _, folder, single = save_tiny_sdxl(str(root / "sdxl"))
    make_celeba(str(root / "celeba"), n=6)  # 6 images, batch 2: an epoch is 3 steps
    return SimpleNamespace(root=root, weights=single, folder=folder, data=str(root / "celeba"))


pytestmark = pytest.mark.usefixtures("one_thread")


def argv(tiny, out, *extra, steps=3):
    args = ["--data", tiny.data, "--weights", tiny.weights, "--out", out, "--resolution", SIZE, "--batch-size", 2,
            "--steps", steps, "--num-workers", 0, "--device", "cpu", "--sample-every", 0, *extra]
    return [str(a) for a in args]


def run(script, *args, torchrun=False):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    launcher = [sys.executable]
    if torchrun:
        with socket.socket() as s:  # a free port for the rendezvous
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        launcher += ["-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}"]
    return subprocess.run([*launcher, os.path.join(ROOT, script), *map(str, args)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)  # 900 s: a shared, loaded machine


def read_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def mapper_tensors(out):
    return load_file(os.path.join(out, "mapper.safetensors"))


def sdxl_digest(model: SDXL) -> str:
    h = hashlib.sha256()
    for module in (model.unet, model.vae, model.clip_l, model.clip_g):
        for name, tensor in module.state_dict().items():
            h.update(name.encode())
            h.update(tensor.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def trained(tiny):
    """`python train.py` for 3 steps, checkpoints every 2."""
    out = tiny.root / "runs" / "user"
    r = run("train.py", *argv(tiny, out, "--checkpoint-every", 2))
    assert r.returncode == 0, r.stderr
    return SimpleNamespace(out=str(out), stderr=r.stderr)


# -- a run as users start it -----------------------------------------------------------------


def test_train_py_logs_every_loss_term_of_every_step(trained):
    log = read_log(trained.out)
    assert [row["step"] for row in log] == [1, 2, 3]
    for row in log:
        assert set(row) == LOG_KEYS
        assert all(math.isfinite(v) for v in row.values())
        assert row["d_neg"] > 0 and row["l_pos"] > 0 and row["l_back"] > 0
        # λ_neg = γ·(k/K)^β with the defaults γ = 1e-2, β = 1, K = 3
        assert row["lambda_neg"] == pytest.approx(1e-2 * row["step"] / 3)
        # L = λ_con·(l_pos + λ_neg·l_neg) + λ_back·l_back with λ_con = λ_back = 1
        assert row["l_con"] == pytest.approx(row["l_pos"] + row["lambda_neg"] * row["l_neg"], rel=1e-5)
        assert row["loss"] == pytest.approx(row["l_con"] + row["l_back"], rel=1e-5)
    assert "6 images" in trained.stderr  # the data summary line


def test_lambda_spread_reaches_the_loss_of_a_run_and_its_log(tiny, tmp_path):
    # The spread of the step's real pseudo-words (both encoders'), weighted into the loss; off by
    # default, where the log still reports it (the fixture run's `set(row) == LOG_KEYS` above).
    train.main(argv(tiny, tmp_path / "run", "--lambda-spread", 2, steps=2))
    for row in read_log(tmp_path / "run"):
        # 2 words per image (z1, z2), 4 in a batch of 2: at most 3 directions, so 1/3 ≤ spread ≤ 1
        assert 1 / 3 - 1e-6 <= row["l_spread"] <= 1
        assert row["loss"] == pytest.approx(row["l_con"] + row["l_back"] + 2 * row["l_spread"], rel=1e-5)


def test_beta_shapes_the_lambda_neg_ramp_of_a_run(tiny, tmp_path):
    train.main(argv(tiny, tmp_path / "run", "--beta", 2, steps=2))
    log = read_log(tmp_path / "run")
    # λ_neg = γ·(k/K)^β with γ = 1e-2, K = 2, β = 2: a quarter of γ at step 1 (β = 1 would give half)
    assert [row["lambda_neg"] for row in log] == pytest.approx([1e-2 / 4, 1e-2])
    for row in log:
        assert row["l_con"] == pytest.approx(row["l_pos"] + row["lambda_neg"] * row["l_neg"], rel=1e-5)


def test_gamma_in_units_of_the_first_steps_d_neg_squared(tiny, tmp_path, monkeypatch):
    # --gamma-unit d_neg: the first GAMMA_WARMUP steps (2 here) measure D, the mean d_neg, with no negative term;
    # then λ_neg = γ·D²·(k/K)^β, logged with its unit D²; a resumed run keeps the unit it measured.
    import step

    monkeypatch.setattr(step, "GAMMA_WARMUP", 2)
    out = tmp_path / "run"
    train.main(argv(tiny, out, "--gamma-unit", "d_neg", "--gamma", 0.5, "--checkpoint-every", 3, steps=3))
    train.main(argv(tiny, out, "--resume", "--gamma", 0.5, steps=5))  # (γ is not kept by a resume: the command line wins)
    log = read_log(out)
    assert [row["step"] for row in log] == [1, 2, 3, 4, 5]
    unit = ((log[0]["d_neg"] + log[1]["d_neg"]) / 2) ** 2
    assert [row["gamma_scale"] for row in log] == pytest.approx([0, 0, unit, unit, unit])
    assert log[0]["lambda_neg"] == 0 and log[1]["lambda_neg"] == 0
    # (K = 3 for the first three steps, 5 after the resume with --steps 5)
    assert log[2]["lambda_neg"] == pytest.approx(0.5 * unit * 3 / 3)
    assert log[4]["lambda_neg"] == pytest.approx(0.5 * unit * 5 / 5)
    for row in log:
        assert row["l_con"] == pytest.approx(row["l_pos"] + row["lambda_neg"] * row["l_neg"], rel=1e-5)
    with pytest.raises(UserError, match="--gamma-unit"):  # a resume never changes the unit
        train.main(argv(tiny, out, "--resume", "--gamma-unit", "absolute", steps=6))


def test_train_py_writes_a_mapper_that_load_mapper_reads_with_its_arguments(trained):
    path = os.path.join(trained.out, "mapper.safetensors")
    f = load_mapper(path)
    assert f.config.z_dim == 512 and f.config.token_widths == (64, 128)  # read from the tiny encoders
    meta = read_metadata(path)
    assert meta["step"] == "3"
    assert json.loads(meta["training_args"])["resolution"] == SIZE
    state = torch.load(os.path.join(trained.out, "state.pt"), weights_only=True)
    assert state["step"] == 3 and (state["epoch"], state["position"]) == (0, 3)
    for name, tensor in mapper_tensors(trained.out).items():
        assert torch.equal(state["mapper"][name], tensor)


def test_train_py_draws_a_labelled_sample_grid_of_codes_by_prompts(tiny, tmp_path, monkeypatch, capsys):
    from PIL import Image

    monkeypatch.setattr(train, "SAMPLE_STEPS", 2)  # 16 images of 20 DDIM steps would take minutes here
    out = tmp_path / "run"
    train.main(argv(tiny, out, "--sample-every", 3))
    grid = Image.open(out / "samples" / "step_000003.png")
    assert "drawing the sample grid of step 3" in capsys.readouterr().err
    assert json.loads(grid.text["rows"]) == {"code": list(train.SAMPLE_CODES)}
    assert json.loads(grid.text["columns"]) == {"prompt": [p for p, _ in train.SAMPLE_PROMPTS]}
    assert json.loads(grid.text["parameters"])["seeds"] == [0, 1, 2, 3]
    # the images fill the lower right; the labels, dark text on white, the margins above and left
    W, H = grid.size
    left, top = W - len(train.SAMPLE_PROMPTS) * SIZE, H - len(train.SAMPLE_CODES) * SIZE
    assert left > 0 and top > 0
    pixels = np.asarray(grid.convert("L"))
    assert pixels[:top].min() < 128 and pixels[top:, :left].min() < 128
    # Cell (row r, column c) is code r in prompt c from seed c, as sample.py would draw it alone
    # (the grid is one batched call: within float32 batch rounding, 1/255).
    from model.mapper import code_to_z

    model, f = SDXL.load(tiny.weights), load_mapper(str(out / "mapper.safetensors"))
    cells = np.asarray(grid.convert("RGB")).astype(int)
    for r, code in enumerate(train.SAMPLE_CODES):
        w_l, w_g = f(code_to_z(code, f.config.z_dim)[None])
        for c, (prompt, concept) in enumerate(train.SAMPLE_PROMPTS):
            alone = model.generate([prompt], [c], [(w_l[0], w_g[0], concept)], steps=2, width=SIZE, height=SIZE)[0]
            cell = cells[top + r * SIZE : top + (r + 1) * SIZE, left + c * SIZE : left + (c + 1) * SIZE]
            assert np.abs(cell - alone).max() <= 1, (r, c)


def test_a_run_folder_says_what_its_mapper_is(trained, tiny, capsys):
    from huggingface_hub import metadata_load

    import sample
    from model import __version__
    from model.export import read_mapper_info

    info = read_mapper_info(os.path.join(trained.out, "mapper.safetensors"))
    weights = open(tiny.weights, "rb").read()
    assert info.base_model == {"name": "tiny_sdxl.safetensors", "bytes": len(weights),
                               "sha256": hashlib.sha256(weights).hexdigest()}
    assert info.concepts == {"man": 6}  # make_celeba's six images are all Male
    assert (info.step, info.training["steps"], info.version) == (3, 3, __version__) and info.lacks() == []
    sample.main(["--mapper", trained.out, "--info"])  # the run folder, as sample.py --mapper takes it
    text = " ".join(capsys.readouterr().out.split())
    assert "steps done 3 of 3" in text and "concepts man (6 images)" in text and info.sha256 in text
    # The model card: the Hub's YAML header, how to use the mapper, and no grid (--sample-every 0).
    card = os.path.join(trained.out, "README.md")
    assert metadata_load(card) == {"library_name": "cocoins", "pipeline_tag": "text-to-image",
                                   "tags": ["cocoins", "stable-diffusion-xl", "text-to-image", "subject-consistency"]}
    text = open(card).read()
    assert f"python sample.py --mapper {trained.out} --code 42 --prompt 'a photo of a man'" in text
    assert f"--mapper {trained.out} --code 42 --save-embedding user-42.safetensors" in text
    assert "No sample grid yet" in text and info.sha256 in text


def test_the_model_card_shows_the_newest_sample_grid(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "SAMPLE_STEPS", 1)
    out = tmp_path / "run"
    # grids at steps 1 and 2; the one checkpoint (step 2) is written before step 2's grid is drawn
    train.main(argv(tiny, out, "--sample-every", 1, steps=2))
    assert sorted(os.listdir(out / "samples")) == ["step_000001.png", "step_000002.png"]
    text = (out / "README.md").read_text()
    assert "![codes in rows, prompts in columns](samples/step_000002.png)" in text and "step_000001" not in text


def test_no_closing_grid_is_drawn_when_none_is_due(tiny, tmp_path, capsys):
    """--steps 3 --sample-every 5: no multiple of 5 is reached, so no grid (it would cost more than training)."""
    out = tmp_path / "run"
    train.main(argv(tiny, out, "--sample-every", 5))
    assert not (out / "samples").exists()
    assert "drawing the sample grid" not in capsys.readouterr().err


def test_the_closing_line_names_the_weights_to_sample_with(trained, tiny):
    last = trained.stderr.strip().splitlines()[-1]
    assert last.startswith("done: ") and f"--weights {tiny.weights}" in last and "--vae" not in last


def test_checkpoints_follow_the_umask_like_the_rest_of_the_run_folder(trained):
    mode = lambda name: os.stat(os.path.join(trained.out, name)).st_mode & 0o777  # noqa: E731
    assert mode("mapper.safetensors") == mode("state.pt") == mode("log.jsonl") == mode("README.md") == (
        0o666 & ~current_umask())


def test_sample_py_code_generates_with_the_trained_mapper(trained, tiny, tmp_path):
    out = tmp_path / "image.png"
    r = run("sample.py", "--weights", tiny.weights, "--mapper", os.path.join(trained.out, "mapper.safetensors"),
            "--code", 7, "--prompt", "a photo of a woman", "--steps", 2, "--width", SIZE, "--height", SIZE,
            "--out", out, "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert out.is_file()


def test_an_existing_run_is_never_overwritten_without_resume(trained, tiny):
    before = mapper_tensors(trained.out)
    r = run("train.py", *argv(tiny, trained.out))
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == (
        f"error: {trained.out} already holds a training run; pass --resume to continue it, or choose another --out")
    after = mapper_tensors(trained.out)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_resuming_a_finished_run_takes_no_step(trained, tiny):
    before, log = mapper_tensors(trained.out), read_log(trained.out)
    r = run("train.py", *argv(tiny, trained.out, "--resume"))
    assert r.returncode == 0, r.stderr
    assert "resuming" in r.stderr and read_log(trained.out) == log
    after = mapper_tensors(trained.out)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_resume_without_a_run_is_a_user_error(tiny, tmp_path):
    with pytest.raises(UserError, match="no run to continue"):
        train.main(argv(tiny, tmp_path / "empty", "--resume"))


@pytest.mark.parametrize("flags, message", [
    (["--batch-size", 0], "--batch-size 0 must be positive"),
    (["--resolution", 60], "multiple of 8"),
    (["--gamma", -1], "--gamma -1.0 must be a finite number >= 0"),
    (["--beta", "nan"], "--beta nan must be a finite number >= 0"),
    (["--lambda-spread", -1], "--lambda-spread -1.0 must be a finite number >= 0"),
    (["--t-min", 800, "--t-max", 200], "t-min < t-max"),
    (["--steps", 0], "--steps 0 must be positive"),
])
def test_bad_numbers_are_one_sentence_user_errors(tiny, tmp_path, flags, message):
    with pytest.raises(UserError, match=message):
        train.main(argv(tiny, tmp_path / "run", *flags))


def test_a_folder_without_celeba_is_a_user_error(tiny, tmp_path):
    empty = tmp_path / "nothing"
    empty.mkdir()
    args = argv(tiny, tmp_path / "run")
    args[args.index("--data") + 1] = str(empty)
    with pytest.raises(UserError, match="no CelebA found"):
        train.main(args)


def test_missing_weights_say_how_to_get_them(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "find_default_weights", lambda: None)
    args = argv(tiny, tmp_path / "run")
    del args[args.index("--weights"):args.index("--weights") + 2]
    with pytest.raises(UserError) as e:
        train.main(args)
    assert str(e.value) == MISSING_WEIGHTS


def test_help_documents_every_flag_with_its_default(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--data", "--weights", "--vae", "--out", "--cache-dir", "--resume", "--steps", "--batch-size",
                 "--resolution", "--split", "--crop", "--lr", "--weight-decay", "--z-dim", "--depth", "--hidden",
                 "--gamma", "--beta", "--lambda-con", "--lambda-back", "--lambda-spread", "--distance", "--t-min", "--t-max",
                 "--checkpoint-every", "--sample-every", "--seed", "--device", "--dtype", "--grad-checkpointing",
                 "--compile", "--attention", "--num-workers", *ABLATIONS[::2]):
        assert flag in text
    assert "(default: 10000)" in text and "(default: runs/cocoins)" in text and "(default: 200)" in text
    assert "(default: 0)" in text and "(default: None)" not in text
    assert "{auto,float32,bfloat16,float16}" in text


@pytest.mark.parametrize("cores, workers", [(1, 0), (2, 1), (4, 3), (64, 4)])
def test_num_workers_defaults_to_what_the_machine_has(monkeypatch, cores, workers):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    assert train.parse_args(["--data", "x"]).num_workers == workers


# -- only f trains ---------------------------------------------------------------------------


def test_training_changes_the_mapper_and_leaves_sdxl_bit_identical(tiny, tmp_path, monkeypatch):
    loaded, initial = [], {}
    original_load, original_step = SDXL.load, train.cocoins_step

    def load(*args, **kwargs):
        loaded.append(original_load(*args, **kwargs))
        return loaded[-1]

    def step(model, f, *args):
        if not initial:
            initial.update({k: v.detach().clone() for k, v in f.state_dict().items()})
        return original_step(model, f, *args)

    monkeypatch.setattr(SDXL, "load", load)
    monkeypatch.setattr(train, "cocoins_step", step)
    out = tmp_path / "run"
    train.main(argv(tiny, out, "--grad-checkpointing", steps=2))

    (model,) = loaded
    assert model.unet.gradient_checkpointing
    assert sdxl_digest(model) == sdxl_digest(SDXL.load(tiny.weights))
    assert not any(p.requires_grad for m in (model.unet, model.vae, model.clip_l, model.clip_g) for p in m.parameters())
    trained = mapper_tensors(out)
    for name, tensor in trained.items():
        if name.endswith("token_mean") or name.endswith("token_std"):
            assert torch.equal(tensor, initial[name])  # the encoders' statistics are buffers, never trained
        elif name.endswith("weight"):
            assert not torch.equal(tensor, initial[name]), f"{name} did not train"


# -- checkpoints, resume, NaN ----------------------------------------------------------------


class Killed(Exception):
    """Stands in for a kill -9 in the middle of a step."""


def test_a_killed_and_resumed_run_equals_an_uninterrupted_one_bit_for_bit(tiny, tmp_path, monkeypatch):
    # 4 steps of batch 2 over 6 images: the resumed part crosses an epoch boundary.
    common = ("--checkpoint-every", 2)
    whole = tmp_path / "whole"
    train.main(argv(tiny, whole, *common, steps=4))

    calls, original_step = [], train.cocoins_step

    def step_then_die(*args):
        calls.append(1)
        if len(calls) == 4:
            raise Killed  # steps 1-3 done, the checkpoint holds step 2: step 3 is lost
        return original_step(*args)

    killed = tmp_path / "killed"
    monkeypatch.setattr(train, "cocoins_step", step_then_die)
    with pytest.raises(Killed):
        train.main(argv(tiny, killed, *common, steps=4))
    assert torch.load(killed / "state.pt", weights_only=True)["step"] == 2
    assert [row["step"] for row in read_log(killed)] == [1, 2, 3]

    monkeypatch.setattr(train, "cocoins_step", original_step)
    train.main(argv(tiny, killed, *common, "--resume", steps=4))
    a, b = mapper_tensors(whole), mapper_tensors(killed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert read_log(killed) == read_log(whole)  # step 3 logged once, with the same numbers
    state_a = torch.load(whole / "state.pt", weights_only=True)["optimizer"]["state"]
    state_b = torch.load(killed / "state.pt", weights_only=True)["optimizer"]["state"]
    assert all(torch.equal(state_a[i]["exp_avg_sq"], state_b[i]["exp_avg_sq"]) for i in state_a)


def test_ctrl_c_before_the_first_checkpoint_saves_the_current_step_and_resumes_bit_for_bit(tiny, tmp_path,
                                                                                         monkeypatch, capsys):
    whole = tmp_path / "whole"
    train.main(argv(tiny, whole, steps=4))

    calls, original_step = [], train.cocoins_step

    def ctrl_c_in_step_3(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # in the middle of step 3: steps 1-2 are done, no checkpoint was due
        return original_step(*args)

    stopped = tmp_path / "stopped"
    monkeypatch.setattr(train, "cocoins_step", ctrl_c_in_step_3)
    with pytest.raises(KeyboardInterrupt):
        train.main(argv(tiny, stopped, steps=4))
    assert torch.load(stopped / "state.pt", weights_only=True)["step"] == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("stopped at step 2, saved; continue with `python train.py --data ") and last.endswith(" --resume`")

    monkeypatch.setattr(train, "cocoins_step", original_step)
    train.main(argv(tiny, stopped, "--resume", steps=4))
    a, b = mapper_tensors(whole), mapper_tensors(stopped)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert read_log(stopped) == read_log(whole)


def test_a_signal_during_the_update_waits_for_its_log_line_and_checkpoint(tiny, tmp_path, monkeypatch):
    """Ctrl-C while AdamW updates f: the step is finished, logged and saved whole, then the run stops."""
    import signal

    step = torch.optim.AdamW.step

    def interrupted_step(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # delivered now, in the middle of the update
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", interrupted_step)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train.main(argv(tiny, out))
    assert [row["step"] for row in read_log(out)] == [1]
    state = torch.load(out / "state.pt", weights_only=True)
    assert state["step"] == 1 and state["optimizer"]["state"][0]["step"] == 1


@pytest.mark.parametrize("signum", ["SIGINT", "SIGTERM"])
def test_python_train_py_stopped_by_a_signal_saves_and_says_how_to_resume(tiny, tmp_path, signum):
    import signal
    import time

    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    # A shell's background job (a CI runner's, say) starts with SIGINT ignored, and its children
    # inherit that; the child here must start as a user's terminal starts it, with SIGINT live.
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *argv(tiny, out, steps=1000)],
                               stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 240
    while not (out / "log.jsonl").is_file() or not (out / "log.jsonl").read_text():
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
        time.sleep(0.2)
    process.send_signal(getattr(signal, signum))
    _, stderr = process.communicate(timeout=240)
    assert process.returncode == 130 and "Traceback" not in stderr, stderr
    steps = [row["step"] for row in read_log(out)]
    assert torch.load(out / "state.pt", weights_only=True)["step"] == steps[-1] >= 1
    assert stderr.strip().splitlines()[-1].startswith(f"stopped at step {steps[-1]}, saved; continue with `python train.py")


def test_resume_takes_the_learning_rate_and_weight_decay_of_its_command_line(tiny, tmp_path, monkeypatch):
    """The NaN message says "continue with --resume and a lower --lr": the optimizer's saved
    state must not bring the old rate back."""
    out = tmp_path / "run"
    train.main(argv(tiny, out, "--lr", "1e-3", steps=1))
    used, step = [], torch.optim.AdamW.step

    def spy(self, *args, **kwargs):
        used.append((self.param_groups[0]["lr"], self.param_groups[0]["weight_decay"]))
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    train.main(argv(tiny, out, "--lr", "1e-6", "--weight-decay", "0.5", "--resume", steps=2))
    assert used == [(1e-6, 0.5)]


def test_a_log_line_cut_short_does_not_stop_a_resume(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n{"step": 3, "lo')
    train.trim_log(str(log), 2)
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2]


def test_a_state_pt_written_with_generator_states_still_resumes(tiny, tmp_path):
    """Runs saved before the global generators' states were dropped from state.pt (nothing in a
    step draws from them) carry an "rng" entry: a resume ignores it and continues as without it."""
    import shutil

    new, old = tmp_path / "new", tmp_path / "old"
    train.main(argv(tiny, new, steps=1))
    shutil.copytree(new, old)
    state = torch.load(old / "state.pt", weights_only=True)
    assert "rng" not in state
    state["rng"] = {"torch": torch.get_rng_state(), "cuda": [], "python": [3, list(range(625)), None],
                    "numpy": ["MT19937", list(range(624)), 0, 0, 0.0]}  # as older train.py wrote it
    torch.save(state, old / "state.pt")
    for out in (new, old):
        train.main(argv(tiny, out, "--resume", steps=2))
    a, b = mapper_tensors(new), mapper_tensors(old)
    assert all(torch.equal(a[k], b[k]) for k in a) and read_log(old) == read_log(new)
    assert torch.load(old / "state.pt", weights_only=True)["step"] == 2


def test_images_that_vanish_during_training_end_in_one_sentence_from_a_worker(tiny, tmp_path, monkeypatch):
    """The dataset's error is raised inside a DataLoader worker, which wraps it in its traceback."""
    import shutil

    data = tmp_path / "celeba"
    shutil.copytree(tiny.data, data)
    original = train.ImageFolder.__init__

    def then_vanish(self, *args, **kwargs):
        original(self, *args, **kwargs)
        for path in data.rglob("*.jpg"):
            path.unlink()

    args = argv(tiny, tmp_path / "run")
    args[args.index("--data") + 1], args[args.index("--num-workers") + 1] = str(data), "1"
    monkeypatch.setattr(train.ImageFolder, "__init__", then_vanish)
    with pytest.raises(UserError) as e:
        train.main(args)
    assert str(e.value).startswith("6 images in a row could not be read from") and "Traceback" not in str(e.value)


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tiny, tmp_path, monkeypatch):
    out = tmp_path / "run"
    at_step_2 = {}

    def loss_nan_at_step_3(*args):
        terms = cocoins_loss(*args)
        if args[6] == 3:  # k
            at_step_2.update(mapper_tensors(out))
            terms.total = terms.total * float("nan")
        return terms

    monkeypatch.setattr(step, "cocoins_loss", loss_nan_at_step_3)
    with pytest.raises(UserError, match=r"the loss became nan at step 3, so training stopped without taking it "
                                        r"\(.*mapper.safetensors and state.pt still hold step 2\)"):
        train.main(argv(tiny, out, "--checkpoint-every", 2, steps=4))
    after = mapper_tensors(out)
    assert at_step_2 and all(torch.equal(after[k], at_step_2[k]) for k in after)
    assert all(torch.isfinite(t).all() for t in after.values())
    assert torch.load(out / "state.pt", weights_only=True)["step"] == 2
    assert read_metadata(str(out / "mapper.safetensors"))["step"] == "2"


# -- the step function -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def step_case(tiny):
    """The tiny SDXL, a small f and one batch of two images with different concept words."""
    model = SDXL.load(tiny.weights)
    torch.manual_seed(0)
    tables = (model.clip_l.text_model.embeddings.token_embedding.weight, model.clip_g.token_embedding.weight)
    f = Mapper(MapperConfig(z_dim=16, depth=2, hidden=32, token_widths=(64, 128)), [embedding_stats(t) for t in tables])
    g = torch.Generator().manual_seed(1)
    batch = {
        "captions": [("a photo of a young man with a beard", "a man smiling"),
                     ("a close-up of a woman", "a portrait photo of a woman wearing glasses")],
        "concept": ["man", "woman"],
        "mask": torch.rand(2, 1, 8, 8, generator=g),
        "time_ids": torch.tensor([[218.0, 178, 0, 0, 64, 64], [218.0, 178, 10, 2, 64, 64]]),
    }
    x0 = torch.randn(2, 4, 8, 8, generator=g)
    noise = step.draw_noise(seed=0, rank=0, step=5, B=2, latent_shape=(4, 8, 8), z_dim=16, t_min=200, t_max=800)
    return model, f, x0, batch, noise


def five_separate_passes(model, f, x0, batch, noise, k, K, config, step_config=step.StepConfig()):
    """Eq. 5-9 written out pass by pass, each prompt encoded alone through SDXL.encode_prompt.

    With step_config's ablations: the positive takes caption P1 ("same prompts"), noise ε1
    ("same noise"); every pass is conditioned on (64, 64, 0, 0, 64, 64) ("sampling" time ids)."""
    alpha_bar_t = alpha_bars()[noise.t]
    x_t_anchor = add_noise(x0, noise.eps1, alpha_bar_t)  # = x_t of the negative
    x_t_pos = add_noise(x0, noise.eps1 if step_config.positive_noise == "same" else noise.eps2, alpha_bar_t)
    positive_caption = 0 if step_config.positive_prompt == "same" else 1
    time_ids = batch["time_ids"]
    if step_config.time_ids == "sampling":
        time_ids = torch.tensor([[64.0, 64, 0, 0, 64, 64]] * len(batch["concept"]))
    w1, w2 = f(noise.z1), f(noise.z2)

    def encode(which, w=None):
        rows = []
        for b, (captions, concept) in enumerate(zip(batch["captions"], batch["concept"])):
            subjects = None if w is None else [(w[0][b], w[1][b], concept)]
            rows.append(model.encode_prompt([captions[which]], subjects))
        return torch.cat([c for c, _ in rows]), torch.cat([p for _, p in rows])

    def x0_hat(x_t, conditioning):
        context, pooled = conditioning
        return x0_from_eps(x_t, model.unet(x_t, noise.t, context, pooled, time_ids), alpha_bar_t)

    x_anchor = x0_hat(x_t_anchor, encode(0, w1))
    x_pos = x0_hat(x_t_pos, encode(positive_caption, w1))
    x_neg = x0_hat(x_t_anchor, encode(0, w2))
    with torch.no_grad():
        x1 = x0_hat(x_t_anchor, encode(0))
        x2 = x0_hat(x_t_pos, encode(positive_caption))
    return cocoins_loss(x_anchor, x_pos, x_neg, x1, x2, batch["mask"], k, K, config)


def loss_and_grads(fn, f, *args):
    f.zero_grad(set_to_none=True)
    terms = fn(*args)
    terms.total.backward()
    return terms, {name: p.grad.clone() for name, p in f.named_parameters()}


@pytest.mark.parametrize("step_config", [
    step.StepConfig(),
    step.StepConfig(positive_prompt="same"),  # Table 5, "same prompts"
    step.StepConfig(positive_noise="same"),  # Table 5, "same noise"
    step.StepConfig(time_ids="sampling"),
], ids=["paper", "same-prompt", "same-noise", "sampling-time-ids"])
def test_batched_3b_and_2b_passes_equal_five_separate_passes(step_case, step_config):
    model, f, x0, batch, noise = step_case
    config = LossConfig(gamma=0.5)  # a weighty negative term, so its gradient counts in the comparison
    batched, grads = loss_and_grads(step.cocoins_step, f, model, f, x0, batch, noise, 3, 4, config, step_config)
    separate, expected = loss_and_grads(five_separate_passes, f, model, f, x0, batch, noise, 3, 4, config, step_config)
    if step_config != step.StepConfig():
        # the flag changes the step: a flag that did nothing would match the paper's triplets
        paper = five_separate_passes(model, f, x0, batch, noise, 3, 4, config)
        assert not torch.allclose(batched.l_pos, paper.l_pos, rtol=1e-3)
    for name in ("total", "l_con", "l_pos", "l_neg", "d_neg", "l_back"):
        assert torch.allclose(getattr(batched, name), getattr(separate, name), rtol=1e-5), name
    assert batched.lambda_neg == separate.lambda_neg == 0.5 * 3 / 4
    for name, g in expected.items():
        assert g.abs().max() > 0, f"no gradient reaches {name}"
        # float32 sums in another order, amplified by the reciprocal's 1/d²: agreement to 1e-4 of
        # the gradient's size (a wrong noise, prompt or code in any pass changes it by O(1))
        assert (grads[name] - g).norm() <= 1e-4 * g.norm(), name
    # gradients flow through SDXL but never into it
    assert all(p.grad is None for m in (model.unet, model.clip_l, model.clip_g) for p in m.parameters())


def test_gradient_checkpointing_gives_the_same_gradients(step_case):
    model, f, x0, batch, noise = step_case
    plain, grads = loss_and_grads(step.cocoins_step, f, model, f, x0, batch, noise, 3, 4, LossConfig())
    model.unet.gradient_checkpointing = True
    try:
        checkpointed, grads_ckpt = loss_and_grads(step.cocoins_step, f, model, f, x0, batch, noise, 3, 4, LossConfig())
    finally:
        model.unet.gradient_checkpointing = False
    assert torch.equal(plain.total, checkpointed.total)
    for name, g in grads.items():
        assert torch.allclose(grads_ckpt[name], g, rtol=1e-6, atol=1e-9), name


def test_step_noise_is_a_function_of_seed_rank_and_step():
    draw = lambda seed, rank, k: step.draw_noise(seed, rank, k, 2, (4, 8, 8), 16, 200, 800)  # noqa: E731
    a, b = draw(0, 0, 7), draw(0, 0, 7)
    assert all(torch.equal(getattr(a, k), getattr(b, k)) for k in ("z1", "z2", "eps1", "eps2", "t"))
    assert not torch.equal(a.z1, a.z2) and not torch.equal(a.eps1, a.eps2)
    assert ((a.t >= 200) & (a.t < 800)).all()
    for other in (draw(1, 0, 7), draw(0, 1, 7), draw(0, 0, 8)):
        assert not torch.equal(a.eps1, other.eps1)


def test_vae_fingerprint_follows_the_weights_not_the_file_layout(tiny):
    single, folder = SDXL.load(tiny.weights), SDXL.load(tiny.folder)
    assert data.vae_fingerprint(single.vae) == data.vae_fingerprint(folder.vae)
    with torch.no_grad():
        single.vae.encoder.conv_in.weight[0, 0, 0, 0] += 1e-3
    assert data.vae_fingerprint(single.vae) != data.vae_fingerprint(folder.vae)


# -- several processes -----------------------------------------------------------------------


# Runs train.py's main (under torchrun or alone) with the step noise of one draw for the combined
# batch, dealt to the ranks as DistributedSampler deals the images (rank r: rows r, r + world, …),
# so every image meets the same noise however the batch is split; saves the mapper each rank ends
# with as rank{N}.safetensors in --out.
COMBINED_BATCH_DRIVER = """
import os, sys
from safetensors.torch import save_file
import step
import train

world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
draw_noise, cocoins_step, seen = train.draw_noise, train.cocoins_step, []

def rows_of_the_combined_draw(seed, rank, k, B, *rest):
    n = draw_noise(seed, 0, k, B * world, *rest)
    return step.StepNoise(*(x[rank::world] for x in (n.z1, n.z2, n.eps1, n.eps2, n.t)))

def step_seeing_f(model, f, *args):
    seen.append(f)
    return cocoins_step(model, f, *args)

train.draw_noise, train.cocoins_step = rows_of_the_combined_draw, step_seeing_f
train.main(sys.argv[1:])
f = getattr(seen[-1], "module", seen[-1])  # the mapper, unwrapped from DDP
out = sys.argv[sys.argv.index("--out") + 1]
save_file({k: v.contiguous() for k, v in f.state_dict().items()}, os.path.join(out, f"rank{rank}.safetensors"))
"""


def test_two_torchrun_gloo_processes_end_with_the_mapper_of_one_process_on_the_combined_batch(tiny):
    """DDP averages f's gradients: both ranks end with identical weights, and those equal one
    process that trained on both ranks' batches at once (the losses are means over the batch)."""
    root = tiny.root / "combined"
    root.mkdir()
    driver = root / "driver.py"
    driver.write_text(COMBINED_BATCH_DRIVER)
    # 6 images: two ranks of batch 2, or one process of batch 4, take one step per epoch; 2 steps cross an epoch.
    r = run(driver, *argv(tiny, root / "ddp", steps=2), torchrun=True)
    assert r.returncode == 0, r.stderr
    r = run(driver, *argv(tiny, root / "one", steps=2), "--batch-size", 4)
    assert r.returncode == 0, r.stderr
    log = read_log(root / "ddp")
    assert [row["step"] for row in log] == [1, 2]  # rank 0 alone writes
    assert all(math.isfinite(row["loss"]) for row in log)
    rank0, rank1 = load_file(root / "ddp" / "rank0.safetensors"), load_file(root / "ddp" / "rank1.safetensors")
    one, saved = load_file(root / "one" / "rank0.safetensors"), mapper_tensors(root / "ddp")
    for name in one:
        assert torch.equal(rank0[name], rank1[name]), name
        assert torch.equal(saved[name], rank0[name]), name  # what train.py wrote: rank 0's mapper
        # Equal up to float rounding, which Adam's step amplifies where a gradient is near 0: a
        # rank stepping on its own half batch is off by about lr = 1e-4 in most elements.
        assert (rank0[name] - one[name]).abs().mean() < 1e-7, name
        torch.testing.assert_close(rank0[name], one[name], rtol=0, atol=5e-5, msg=name)


def test_captions_whose_concept_would_be_truncated_away_are_refused():
    from model import clip

    ok = train.concept_survives_truncation(clip.Tokenizer.bundled("eos"))
    assert ok("a photo of a woman reading", "woman")
    assert not ok("a photo of a man reading", "woman")  # absent
    # BOS, 74 words, the concept at position 75, EOS at 76: a full prompt, whose last word
    # insertion drops to keep the EOS; one word fewer and the concept moves to 75 and survives.
    assert not ok("red " * 74 + "woman", "woman")
    assert ok("red " * 73 + "woman", "woman")
    assert not ok("red " * 80 + "woman", "woman")  # truncated away before insertion


# -- the method's choices and the paper's ablations, as flags --------------------------------

ABLATIONS = ("--negative", "subtract", "--mask", "none", "--mask-reduction", "area", "--positive-prompt", "same",
             "--positive-noise", "same", "--time-ids", "sampling", "--mapper-norm", "none")


def test_ablation_flags_reach_the_step_and_a_resume_keeps_them(tiny, tmp_path, monkeypatch):
    seen, original_step = [], train.cocoins_step

    def spy(model, f, x0, batch, noise, k, K, loss_config, step_config, gamma_scale):
        seen.append((f.config.norm, loss_config, step_config))
        return original_step(model, f, x0, batch, noise, k, K, loss_config, step_config, gamma_scale)

    monkeypatch.setattr(train, "cocoins_step", spy)
    out = tmp_path / "run"
    train.main(argv(tiny, out, *ABLATIONS, steps=1))
    norm, loss_config, step_config = seen[0]
    assert norm == "none" and load_mapper(str(out / "mapper.safetensors")).config.norm == "none"
    assert (loss_config.negative, loss_config.mask, loss_config.mask_reduction) == ("subtract", "none", "area")
    assert step_config == step.StepConfig(positive_prompt="same", positive_noise="same", time_ids="sampling")
    (row,) = read_log(out)
    # subtract: l_neg = −d_neg; no mask: m̃ = 0, so L_back = 0; same prompt and noise: the positive is the anchor
    assert row["l_neg"] == pytest.approx(-row["d_neg"]) and row["d_neg"] > 0
    assert row["l_back"] == 0.0 and row["l_pos"] < 1e-3 * row["d_neg"]
    saved = torch.load(out / "state.pt", weights_only=True)["args"]
    assert {k: saved[k] for k in train.METHOD_DEFAULTS} == dict(
        negative="subtract", mask="none", mask_reduction="area", positive_prompt="same", positive_noise="same",
        time_ids="sampling", mapper_norm="none", mapper_gain=1.0, gamma_unit="absolute")

    # --resume without the flags continues the run's own method ...
    seen.clear()
    train.main(argv(tiny, out, "--resume", steps=2))
    assert seen[0][0] == "none" and seen[0][1:] == (loss_config, step_config)
    # ... and a resume that names another is refused before anything loads
    with pytest.raises(UserError, match=r"trained with --negative subtract; a resumed run keeps its method, "
                                        r"so drop --negative reciprocal"):
        train.main(argv(tiny, out, "--resume", "--negative", "reciprocal", steps=3))


def test_mapper_gain_reaches_the_mapper_file_and_a_resume_keeps_it(tiny, tmp_path):
    out = tmp_path / "run"
    train.main(argv(tiny, out, "--mapper-gain", "2.5", steps=1))
    assert load_mapper(str(out / "mapper.safetensors")).config.gain == 2.5
    assert torch.load(out / "state.pt", weights_only=True)["args"]["mapper_gain"] == 2.5
    train.main(argv(tiny, out, "--resume", steps=2))
    assert load_mapper(str(out / "mapper.safetensors")).config.gain == 2.5
    with pytest.raises(UserError, match=r"trained with --mapper-gain 2.5; a resumed run keeps its method"):
        train.main(argv(tiny, out, "--resume", "--mapper-gain", "1", steps=3))


def test_a_new_run_takes_the_papers_choices_by_default(tiny, tmp_path):
    args = train.parse_args(argv(tiny, tmp_path / "run"))
    train.keep_method(args, None)
    assert {k: getattr(args, k) for k in train.METHOD_DEFAULTS} == dict(
        negative="reciprocal", mask="subject", mask_reduction="all", positive_prompt="other", positive_noise="other",
        time_ids="data", mapper_norm="layernorm", mapper_gain=1.0, gamma_unit="absolute")
    # a run saved before these flags existed resumes with what it was trained with: the defaults
    args = train.parse_args(argv(tiny, tmp_path / "run", "--resume"))
    train.keep_method(args, {"lr": 1e-4})
    assert args.negative == "reciprocal" and args.mapper_norm == "layernorm" and args.mapper_gain == 1.0
    for bad in ("0", "-1", "nan"):
        with pytest.raises(UserError, match="--mapper-gain .* must be a finite number > 0"):
            train.parse_args(argv(tiny, tmp_path / "run", "--mapper-gain", bad))
    with pytest.raises(UserError, match="--mapper-gain 3.0 scales the output LayerNorm, which --mapper-norm none removes"):
        train.parse_args(argv(tiny, tmp_path / "run", "--mapper-norm", "none", "--mapper-gain", "3"))


def tiny_mapper(norm, gain=1.0):
    torch.manual_seed(0)
    stats = [(torch.randn(6), torch.rand(6) + 0.5), (torch.randn(10), torch.rand(10) + 0.5)]
    return Mapper(MapperConfig(z_dim=8, depth=2, hidden=16, token_widths=(6, 10), norm=norm, gain=gain), stats)


def test_mapper_norm_none_is_the_plain_linear_output_and_layernorm_normalises_it():
    z = torch.randn(3, 8)
    for norm in ("none", "layernorm"):
        f = tiny_mapper(norm)
        h = torch.nn.functional.leaky_relu(f.layers[0](z), 0.2)
        for head, w in zip(f.heads, f(z)):
            u = head.proj(h)  # W·h + b
            if norm == "layernorm":
                u = (u - u.mean(-1, keepdim=True)) / torch.sqrt(u.var(-1, unbiased=False, keepdim=True) + 1e-5)
            # w = μ + σ ⊙ u
            assert torch.allclose(w, head.token_mean + head.token_std * u, atol=1e-5), norm
    assert not torch.allclose(tiny_mapper("none")(z)[0], tiny_mapper("layernorm")(z)[0])


def test_mapper_gain_scales_the_normalised_word_around_the_token_mean():
    # w = μ + g·σ⊙LayerNorm(Wh+b): the standardised word (w − μ)/σ has RMS g (1: a real token's spread)
    z = torch.randn(3, 8)
    for g in (1.0, 4.0):
        f = tiny_mapper("layernorm", gain=g)
        for head, w in zip(f.heads, f(z)):
            rms = ((w - head.token_mean) / head.token_std).pow(2).mean(-1).sqrt()
            assert torch.allclose(rms, torch.full_like(rms, g), rtol=1e-3)
    one, four = tiny_mapper("layernorm", 1.0), tiny_mapper("layernorm", 4.0)
    for h1, w1, w4 in zip(one.heads, one(z), four(z)):
        torch.testing.assert_close(w4 - h1.token_mean, 4 * (w1 - h1.token_mean), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="gain > 0"):
        tiny_mapper("layernorm", gain=0.0)


def test_a_saved_mapper_keeps_its_norm_and_one_saved_before_the_field_loads_as_layernorm(tmp_path):
    from safetensors.torch import save_file

    from model.checkpoint import save_mapper

    f = tiny_mapper("none")
    save_mapper(str(tmp_path / "none.safetensors"), f)
    assert load_mapper(str(tmp_path / "none.safetensors")).config.norm == "none"
    old = tiny_mapper("layernorm")
    fields = {k: v for k, v in vars(old.config).items() if k not in ("norm", "gain")}  # as older versions wrote it
    save_file({k: v.contiguous() for k, v in old.state_dict().items()}, str(tmp_path / "old.safetensors"),
              metadata={"format": "cocoins-mapper", "mapper_config": json.dumps(fields)})
    loaded = load_mapper(str(tmp_path / "old.safetensors"))
    z = torch.randn(2, 8)
    assert loaded.config.norm == "layernorm" and loaded.config.gain == 1.0 and torch.equal(loaded(z)[1], old(z)[1])


def test_init_mapper_starts_from_the_given_weights_as_the_first_steps_loss_shows(tiny, tmp_path, monkeypatch):
    from model.checkpoint import load_mapper

    def first_loss(out):
        with open(out / "log.jsonl") as fh:
            return json.loads(fh.readline())["loss"]

    train.main(argv(tiny, tmp_path / "a", steps=2))  # a trained mapper to start from
    given = tmp_path / "a" / "mapper.safetensors"
    train.main(argv(tiny, tmp_path / "b", "--init-mapper", tmp_path / "a", steps=1))
    train.main(argv(tiny, tmp_path / "c", steps=1))  # same seed, fresh f
    # The same run with new_mapper swapped for the given weights: what --init-mapper must equal.
    monkeypatch.setattr(train, "new_mapper", lambda model, args: load_mapper(str(given)).train().requires_grad_(True))
    train.main(argv(tiny, tmp_path / "d", steps=1))
    assert first_loss(tmp_path / "b") == first_loss(tmp_path / "d")
    assert first_loss(tmp_path / "b") != first_loss(tmp_path / "c")


def test_init_mapper_that_is_missing_or_for_other_encoders_is_one_sentence(tiny, tmp_path):
    from model.checkpoint import load_mapper, save_mapper
    from model.mapper import Mapper

    with pytest.raises(UserError, match="no mapper there"):
        train.main(argv(tiny, tmp_path / "x", "--init-mapper", tmp_path / "nothing", steps=1))
    other = load_mapper(str(_any_mapper(tiny, tmp_path)))
    wide = Mapper(replace(other.config, token_widths=(32, 48)), [(torch.zeros(32), torch.ones(32)), (torch.zeros(48), torch.ones(48))])
    save_mapper(str(tmp_path / "wide.safetensors"), wide)
    with pytest.raises(UserError, match="encoders .* wide"):
        train.main(argv(tiny, tmp_path / "y", "--init-mapper", tmp_path / "wide.safetensors", steps=1))


def _any_mapper(tiny, tmp_path):
    train.main(argv(tiny, tmp_path / "any", steps=1))
    return tmp_path / "any" / "mapper.safetensors"
