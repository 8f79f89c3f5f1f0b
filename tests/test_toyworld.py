"""The toy world: its people, captions and masks, the base model's pieces, and the whole experiment at smoke size."""

import json
import os
import random
import re
import shutil
import subprocess
import sys

from dataclasses import replace

import numpy as np
import pytest
import torch

from toyworld import base, experiment, judge as judge_lib, measures, report, ship, world

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_identities_are_distinct_and_cover_every_factor():
    people = world.draw_identities(600, random.Random(0))
    assert len(set(people)) == 600
    for k, (factor, values) in enumerate(world.FACTORS.items()):
        seen = {getattr(p, factor) for p in people}
        assert seen == set(range(len(values))), factor
    with pytest.raises(ValueError):
        world.draw_identities(10_000, random.Random(0))


def test_mask_is_exactly_where_the_person_changes_the_picture():
    rng = random.Random(3)
    for who in world.draw_identities(20, rng):
        at = world.draw_placement(rng)
        image, mask = world.render(who, at)
        # The same placement with the person drawn far outside the picture: the background alone.
        empty, empty_mask = world.render(who, world.Placement(at.scene, at.pose, 5.0, at.height, at.feet, at.facing, at.seed))
        assert empty_mask.max() == 0
        changed = np.abs(image.astype(int) - empty.astype(int)).sum(-1) > 0
        inside = mask > 0
        # Every pixel the person changes is in the mask, and the mask holds nothing else but pixels
        # the person covers in a colour that happens to equal the background's (rare).
        assert not (changed & ~inside).any()
        assert (inside & ~changed).sum() <= 0.05 * inside.sum()
        assert inside.sum() > 0.05 * inside.size


def test_captions_name_the_scene_and_the_concept_word_once_and_attributes_only_sometimes():
    rng = random.Random(1)
    named_hair = 0
    for who in world.draw_identities(200, rng):
        at = world.draw_placement(rng)
        concept = world.GENDERS[who.gender]
        text = world.caption(concept, who, at, rng)
        assert len(re.findall(rf"\b{concept}\b", text)) == 1, text
        assert any(phrase in text for phrase in world.SCENE_PHRASES[world.SCENES[at.scene]]), text
        named_hair += who.names()["hair"] in text.split()
    assert 0.15 * 200 < named_hair < 0.6 * 200  # some captions name the hair colour, most do not


def false_attribute_phrases(who):
    """Phrases a caption of `who` must never hold: another skin, hair colour, hair style, shirt
    colour or pattern than the person's own, or glasses the person does not wear."""
    f = who.names()
    false = [world.SKIN_WORDS[s] for s in world.SKINS if s != f["skin"]]
    false += [f"{c} hair" for c in world.HAIRS if c != f["hair"]]
    false += [f"{s} hair" for s in ("short", "long") if s != f["style"]] + (["bun"] if f["style"] != "bun" else [])
    false += [f"{c} shirt" for c in world.SHIRTS if c != f["shirt"]]
    false += [f"{p} " for p in ("plain", "striped") if p != f["pattern"]]
    false += ["glasses"] if f["glasses"] == "no" else []
    return false


def test_captions_name_only_attributes_the_person_has():
    rng = random.Random(2)
    people = world.draw_identities(300, rng)
    named = {"glasses": 0, "hair": 0, "shirt": 0}
    for who in people:
        f = who.names()
        for _ in range(3):
            text = world.caption(world.GENDERS[who.gender], who, world.draw_placement(rng), rng)
            # the skin word "brown-skinned" holds the hair colour "brown": compare whole words
            words = " " + re.sub(r"brown-skinned", "brown_skinned", text) + " "
            for phrase in false_attribute_phrases(who):
                assert f" {phrase.replace('brown-skinned', 'brown_skinned')}" not in words, (phrase, f, text)
            named["glasses"] += "glasses" in text
            named["hair"] += f"{f['hair']} hair" in text
            named["shirt"] += f"{f['shirt']} shirt" in text
    # the true attributes are named, in some captions
    assert all(n > 30 for n in named.values()), named
    # and with every attribute asked for, a person wearing glasses gets them in the phrase
    spectacled = next(p for p in people if p.names()["glasses"] == "yes")
    assert "glasses" in world.describe("woman", spectacled.names(), rng, named=set(world.MENTION))


def test_export_is_read_by_data_py_with_identity_labels(tmp_path):
    from data import DataConfig, ImageFolder

    facts = world.export(str(tmp_path), replace(world.FIRST_PASS, identities=5, images_per_identity=3))
    assert facts == {"images": 15, "identities": 5, "named": 0, "mapper_images": 15}
    ds = ImageFolder(DataConfig(root=str(tmp_path), resolution=64))
    assert len(ds) == 15
    item = ds[0]
    assert item["concept"] in ("man", "woman", "person")
    assert all(re.search(rf"\b{item['concept']}\b", c) for c in item["captions"])
    assert item["mask"].shape == (1, 8, 8) and 0 < item["mask"].sum() < 64
    lines = open(tmp_path / "identity_CelebA.txt").read().split()
    assert lines[:2] == ["000001.png", "1"] and lines[-2:] == ["000015.png", "5"]


def test_folding_the_latent_scale_keeps_the_decoder_and_standardises_the_latents():
    torch.manual_seed(0)
    vae = base.build(0)["vae"].eval()
    x = torch.rand(6, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        z = vae.encode(x).mode()
        before = vae.decode(z)
        s = base.fold_latent_scale(vae, z)
        z2 = vae.encode(x).mode()
        after = vae.decode(z2)
    torch.testing.assert_close(z2, z * s, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    assert abs((z2 * base.SCALING_FACTOR).std().item() - 1) < 1e-3


def test_base_model_saved_in_the_official_layout_loads_through_sdxl_load(tmp_path):
    from model.sdxl import SDXL

    models = base.build(0)
    path = str(tmp_path / "base.safetensors")
    base.save_single_file(path, models)
    model = SDXL.load(path)
    ids = model.tok_l(["a photo of a woman on the beach"])
    ours = models["clip_l"](models["clip_l"].embed(ids), torch.tensor([9])).penultimate
    loaded = model.clip_l(model.clip_l.embed(ids), torch.tensor([9])).penultimate
    torch.testing.assert_close(loaded, ours)
    assert model.unet.config == base.UNET and model.vae.config.ch_mult == base.VAE.ch_mult


def test_score_on_known_readings():
    # Two codes of two images each: the first code's images agree in every factor, the second's do not.
    factors = torch.tensor([[0, 1, 2, 0, 1, 0, 0], [0, 1, 2, 0, 1, 0, 0], [1, 0, 0, 1, 2, 1, 1], [1, 0, 0, 1, 3, 1, 1]])
    emb = torch.nn.functional.normalize(torch.rand(4, 24), dim=1)
    reading = {"embedding": emb, "factors": factors, "scene": torch.tensor([0, 1, 2, 2])}
    m = measures.score(reading, [[0, 1], [2, 3]], [0, 1, 2, 3])
    assert m["identity_agreement"] == 0.5
    assert m["scene_accuracy"] == 0.75
    cos = lambda a, b: torch.nn.functional.cosine_similarity(a, b, dim=0).item()  # noqa: E731
    assert m["face_sim"] == pytest.approx((cos(emb[0], emb[1]) + cos(emb[2], emb[3])) / 2, abs=1e-6)
    # Factor by factor: the second code's images differ in the shirt (column 4) alone.
    assert m["agree_shirt"] == 0.5
    assert all(m[f"agree_{f}"] == 1.0 for f in world.FACTORS if f != "shirt")
    # pair_div: 1 − the mean cosine over the four pairs of images from different codes.
    between = [cos(emb[i], emb[j]) for i in (0, 1) for j in (2, 3)]
    assert m["pair_div"] == pytest.approx(1 - sum(between) / 4, abs=1e-6)


def test_face_sim_of_a_code_is_the_mean_over_all_its_image_pairs_not_its_first_two():
    # One code of three images: the first two read as one person, the third as another. Its three
    # pairs have cosines 1, 0, 0: Face Sim 1/3 (its first two images alone would give 1).
    emb = torch.zeros(3, 24)
    emb[0, 0] = emb[1, 0] = emb[2, 5] = 1
    factors = torch.tensor([[0, 1, 2, 0, 1, 0, 0], [0, 1, 2, 0, 1, 0, 0], [0, 1, 2, 0, 1, 0, 1]])
    m = measures.score({"embedding": emb, "factors": factors, "scene": torch.tensor([0, 0, 0])}, [[0, 1, 2]], [0, 0, 0])
    assert m["face_sim"] == pytest.approx(1 / 3, abs=1e-9)
    # and all seven factors agree in one of the three pairs (glasses, column 6, split the others)
    assert m["identity_agreement"] == pytest.approx(1 / 3) and m["agree_glasses"] == pytest.approx(1 / 3)


def test_every_row_is_a_train_py_flag_set():
    import train

    for row in [*experiment.GAMMAS.values(), experiment.TIME_IDS_SAMPLING]:
        args = train.parse_args(["--data", "x", *row.flags])
        for flag, value in zip(row.flags[::2], row.flags[1::2]):
            parsed = getattr(args, flag.lstrip("-").replace("-", "_"))
            assert parsed == type(parsed)(value), (flag, value)


def test_judge_reads_shapes():
    images, labels = judge_lib.render_set(8, seed=0)
    assert images.shape == (8, 3, 64, 64) and images.dtype == torch.uint8 and labels.shape == (8, 8)
    out = judge_lib.Judge().read(images)
    assert out["embedding"].shape == (8, 24) and out["factors"].shape == (8, 7) and out["scene"].shape == (8,)
    torch.testing.assert_close(out["embedding"].norm(dim=1), torch.ones(8))


def test_judge_reads_the_most_likely_value_of_every_head():
    # Heads that ignore the image (zero weights) and whose biases put the most likely value at a known
    # place, the least likely elsewhere: the reading is the most likely one, the embedding their probabilities.
    judge = judge_lib.Judge()
    likeliest = {}
    with torch.no_grad():
        for k, (name, head) in enumerate(judge.heads.items()):
            n = head.out_features
            head.weight.zero_()
            head.bias.copy_(torch.linspace(0, 1, n).roll(k % n))  # 1 (likeliest) at (n − 1 + k) mod n, 0 at k mod n
            likeliest[name] = (n - 1 + k) % n
    images, _ = judge_lib.render_set(3, seed=1)
    out = judge.read(images)
    assert out["scene"].tolist() == [likeliest["scene"]] * 3
    assert out["factors"].tolist() == [[likeliest[f] for f in judge_lib.IDENTITY]] * 3
    probs = torch.cat([judge.heads[f].bias.softmax(-1) for f in judge_lib.IDENTITY])
    torch.testing.assert_close(out["embedding"], torch.nn.functional.normalize(probs, dim=0).expand(3, -1))


def test_the_whole_experiment_runs_at_smoke_size(tmp_path):
    results = tmp_path / "RESULTS.md"
    # --jobs 2: mapper runs train side by side, as on the 2-core machine; --rows all: every step
    proc = subprocess.run([sys.executable, "-m", "toyworld", "--scale", "smoke", "--jobs", "2",
                           "--work", str(tmp_path / "work"), "--results", str(results)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = results.read_text()
    for needle in ("python -m toyworld --scale smoke --jobs 2", "## Is CoCoIns working here?", "| CoCoIns (full) |",
                   "| Dataset through the VAE", "| Base model, a named person called by name |",
                   "## Size conditioning in training", "## γ on two base models", "shirt colours"):
        assert needle in text, needle
    raw = json.loads(text.split("```json")[1].split("```")[0])
    assert [b["tag"] for b in raw["bases"]] == ["seed0", "seed1"]
    for b in raw["bases"]:
        assert len(b["full_rows"]) == 2 and 0 <= b["dataset"]["scene_accuracy"] <= 1
        assert "truth_agreement" in b["by_name"] and "census" in b["full_rows"][0] and "inverted" in b
    assert set(raw["gamma"]) == {f"{model}, γ absolute" for model in ("64 channels (base seed 0)", "96 channels")}
    assert [r["gamma"] for r in raw["gamma"]["96 channels, γ absolute"]] == list(experiment.GAMMAS)
    assert {"data", "sampling"} <= set(raw["time_ids"]) and "census" in raw["spread"]
    # The curve's points are the checkpoints a watcher copies while train.py runs (a poll: at smoke size two
    # may land within one poll, so only the final one is certain).
    assert len(raw["bases"][0]["curve"]) >= 1 and raw["bases"][0]["curve"][-1]["step"] == 2
    for name in ("contact_base.png", "contact_cocoins.png", "contact_by_name.png", "curve_loss.png",
                 "curve_face_sim.png", "vae_reconstructions_seed0.png"):
        assert (tmp_path / "figures" / name).is_file(), name
    # The mappers trained on the unnamed people's own folder, through each base model.
    runs = sorted(r for r in (tmp_path / "work" / "runs").glob("cocoins-full-*") if "-ch" not in r.name)
    assert [r.name for r in runs] == ["cocoins-full-seed0-seed0", "cocoins-full-seed0-seed1",
                                      "cocoins-full-seed1-seed0", "cocoins-full-seed1-seed1"]
    command = json.loads((runs[2] / "done.json").read_text())["command"]
    assert command[command.index("--data") + 1].endswith("data-mapper")
    assert command[command.index("--weights") + 1].endswith("base-seed1.safetensors")
    # With --jobs 2 the base models, judges and learned words were made in child processes on one thread each:
    # remade here one after another in a single process on one thread, the files are the same bytes (two
    # trainings sharing one process's generator would not be).
    remade = tmp_path / "remade"
    remade.mkdir()
    for name in ("world.json", "data", "data-mapper"):
        (shutil.copytree if (tmp_path / "work" / name).is_dir() else shutil.copy)(tmp_path / "work" / name, remade / name)
    script = ("import sys, torch; torch.set_num_threads(1)\n"
              "from toyworld import experiment as E\n"
              "exps = [E.Experiment(E.SCALES['smoke'], sys.argv[1], sys.argv[2], base_config=E.replace("
              "E.SCALES['smoke'].base_config, seed=b)) for b in (0, 1)]\n"
              "for exp in exps: E.prepare_base(exp)\n"
              "for exp in exps: E.learn_words(exp)\n")
    alone = subprocess.run([sys.executable, "-c", script, str(remade), str(tmp_path / "remade-figures")],
                           cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert alone.returncode == 0, alone.stderr[-2000:]
    for seed in (0, 1):
        for name in (f"vae-seed{seed}.safetensors", f"base-seed{seed}.safetensors", f"judge-seed{seed}.pt",
                     f"inversion-layernorm-seed{seed}.pt"):
            assert experiment.file_digest(str(remade / name)) == experiment.file_digest(str(tmp_path / "work" / name)), name
    # A rerun reuses the world, the base models, the judges and the trained mappers, and the rows drawn without a
    # mapper where no figure asks for them to be redrawn (base seed 1 draws no figure).
    kept = {p: p.stat().st_mtime_ns for p in (tmp_path / "work" / "rows").glob("seed1-*.json")}
    assert len(kept) == 2 + len(experiment.NAMED) + 1  # base rows (one per mapper seed), named rows, by name
    again = subprocess.run([sys.executable, "-m", "toyworld", "--scale", "smoke", "--rows", "core",
                            "--work", str(tmp_path / "work"), "--results", str(results)],
                           cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "training " not in again.stdout and "vae step" not in again.stdout and "judge step" not in again.stdout
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
    assert json.loads(results.read_text().split("```json")[1].split("```")[0])["bases"][1]["base_rows"] == \
        raw["bases"][1]["base_rows"]


def test_a_run_is_known_by_its_resolved_settings():
    # The cache key of a mapper run: a default spelled out is the same run, a changed setting is
    # another, and where the run writes is no part of what it computes.
    from losses import LossConfig
    from toyworld.experiment import run_identity

    plain = run_identity(["--data", "d", "--out", "a"])
    assert run_identity(["--data", "d", "--out", "b", "--cache-dir", "c", "--gamma", str(LossConfig.gamma),
                         "--mask-reduction", LossConfig.mask_reduction]) == plain
    assert run_identity(["--data", "d", "--out", "a", "--gamma", str(LossConfig.gamma * 10)]) != plain
    assert run_identity(["--data", "d", "--out", "a", "--seed", "1"]) != plain
    assert plain["mask_reduction"] == LossConfig.mask_reduction  # method flags left out carry train.py's default


def test_a_run_is_also_known_by_the_base_model_it_trains_through(tmp_path):
    # The runs folder outlives a retrained base.safetensors at the same path: its runs must not be reused.
    from dataclasses import replace

    smoke = experiment.SCALES["smoke"]
    args = ["--data", "d", "--weights", "w.safetensors", "--out", "a"]
    one = experiment.Experiment(smoke, str(tmp_path / "w"), str(tmp_path / "f"), log=lambda *a: None)
    same = experiment.Experiment(smoke, str(tmp_path / "w2"), str(tmp_path / "f2"), log=lambda *a: None)
    other = experiment.Experiment(replace(smoke, base_config=replace(smoke.base_config, text="frozen")),
                                  str(tmp_path / "w3"), str(tmp_path / "f3"), log=lambda *a: None)
    assert one.run_identity(args) == same.run_identity(args)
    assert one.run_identity(args) != other.run_identity(args)


@pytest.mark.parametrize("text", ["trained", "frozen"])
def test_the_text_encoders_train_with_the_unet_except_their_token_tables(tmp_path, text):
    from dataclasses import replace

    world.export(str(tmp_path), replace(world.FIRST_PASS, identities=4, images_per_identity=1))
    _, _, truth = base.load_world(str(tmp_path))
    models = base.build(0)
    before = {k: v.clone() for name in ("clip_l", "clip_g", "unet") for k, v in models[name].state_dict(prefix=name + ".").items()}
    encoder = base.TextEncoder(models["clip_l"], models["clip_g"], train=text == "trained")
    cfg = replace(base.BaseConfig(), unet_steps=3, unet_batch=2, text=text, ema=0.0)  # ema 0: the saved weights are the last step's
    base.train_unet(models["unet"], encoder, torch.randn(4, 4, 8, 8), truth, cfg, log=lambda *a: None)
    after = {k: v for name in ("clip_l", "clip_g", "unet") for k, v in models[name].state_dict(prefix=name + ".").items()}
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    tables = {"clip_l.text_model.embeddings.token_embedding.weight", "clip_g.token_embedding.weight"}
    assert not moved & tables  # the mapper's token statistics keep describing the table
    assert any(k.startswith("unet.") for k in moved)
    text_moved = {k for k in moved if k.startswith("clip_")}
    if text == "trained":
        # Every tensor on the path to the context and the pooled vector learns (CLIP-L's last layer
        # and final norm are not on it: SDXL reads its penultimate state).
        assert "clip_l.text_model.encoder.layers.0.self_attn.q_proj.weight" in text_moved
        assert "clip_g.text_projection" in text_moved and "clip_g.positional_embedding" in text_moved
    else:
        assert not text_moved
    assert not any(p.requires_grad for p in encoder.parameters()) and not encoder.training


def test_named_jobs_name_one_person_per_code_in_every_scene():
    scale = experiment.SCALES["full"]
    jobs = experiment.named_jobs(scale)
    assert [(j["code"], j["scene"], j["seed"]) for j in jobs] == [(j["code"], j["scene"], j["seed"]) for j in experiment.eval_jobs(scale)]
    people = {}
    for j in jobs:
        phrase = world.SCENE_PHRASES[j["scene"]][0]
        assert j["prompt"].endswith(" " + phrase) and re.search(rf"\b{j['concept']}\b", j["prompt"])
        people.setdefault(j["code"], set()).add(j["prompt"][: -len(phrase)])
    assert all(len(p) == 1 for p in people.values())  # the same words for a code in every scene
    assert len({next(iter(p)) for p in people.values()}) > len(people) // 2  # codes name different people
    shirts = experiment.named_jobs(scale, ("shirt",))
    assert all(re.fullmatch(rf"a photo of a {j['concept']} in an? \w+ shirt .+", j["prompt"]) for j in shirts)


def test_a_run_recorded_before_a_flag_existed_is_found_under_that_flags_first_default(tmp_path):
    smoke = experiment.SCALES["smoke"]
    exp = experiment.Experiment(smoke, str(tmp_path / "w"), str(tmp_path / "f"), log=lambda *a: None)
    row = experiment.Row("r", ())
    run = tmp_path / "w" / "runs" / "old-run"
    run.mkdir(parents=True)
    # What train_row would run for this row, recorded by an older train.py without --mapper-gain.
    args = ["--data", exp.mapper_data, "--weights", exp.weights, "--out", "x", "--steps", str(smoke.mapper_steps),
            "--batch-size", str(smoke.mapper_batch), "--lr", str(smoke.mapper_lr), "--resolution", str(world.SIZE),
            "--sample-every", "0", "--device", "cpu", "--seed", "0"]
    old = exp.run_identity(args)
    for flag in experiment.BEFORE_FLAG:
        old.pop(flag)
    (run / "done.json").write_text(json.dumps({"identity": old}))
    assert exp.train_row(row, 0) == str(run)  # found, not retrained
    # ... while a run with another value of the new flag is another run.
    assert exp.run_identity(args + ["--mapper-gain", "3"]) != {**experiment.BEFORE_FLAG, **old}


def test_pseudo_word_stats_read_collapse_and_loudness():
    from model.mapper import Mapper, MapperConfig

    torch.manual_seed(0)
    stats = [(torch.randn(6), torch.rand(6) + 0.5), (torch.randn(10), torch.rand(10) + 0.5)]
    codes = [1, 2, 3, 4]
    for gain in (1.0, 3.0):
        f = Mapper(MapperConfig(z_dim=8, depth=2, hidden=16, token_widths=(6, 10), gain=gain), stats)
        s = measures.mapper_word_stats(f, codes)
        assert s["w_rms"] == pytest.approx(gain, rel=1e-3) and s["w_cos"] < 0.9
        # A mapper that ignores z (its first layer's weight zeroed, only its bias left) gives every
        # code one word: cosine 1.
        torch.nn.init.zeros_(f.layers[0].weight)
        torch.nn.init.normal_(f.layers[0].bias)
        assert measures.mapper_word_stats(f, codes)["w_cos"] == pytest.approx(1.0, abs=1e-5)


def test_word_dims_count_the_directions_the_codes_words_vary_in():
    from model.mapper import Mapper, MapperConfig

    torch.manual_seed(0)
    stats = [(torch.zeros(16), torch.ones(16)), (torch.zeros(8), torch.ones(8))]
    f = Mapper(MapperConfig(z_dim=8, depth=1, hidden=8, token_widths=(16, 8), norm="none"), stats)
    # depth 1: the CLIP-L word is W·z + b. With W of rank 2, 256 codes' words vary in at most 2
    # directions; equal singular values and z ~ N(0, I) make it close to exactly 2.
    with torch.no_grad():
        q, _ = torch.linalg.qr(torch.randn(16, 2))
        p, _ = torch.linalg.qr(torch.randn(8, 2))
        f.heads[0].proj.weight.copy_(q @ p.T)
    assert measures.mapper_word_stats(f, [1, 2, 3])["w_dims"] == pytest.approx(2.0, rel=0.15)
    # A full-rank W: the words vary in all 8 directions z has.
    with torch.no_grad():
        f.heads[0].proj.weight.copy_(torch.linalg.qr(torch.randn(16, 8))[0])
    assert measures.mapper_word_stats(f, [1, 2, 3])["w_dims"] == pytest.approx(8.0, rel=0.15)


def test_factor_footprints_measure_each_factor_alone():
    # A stand-in VAE whose "latent" is the image itself: the footprint of a factor is then how
    # much of the picture it repaints; a shirt covers far more than a pair of glasses.
    class Identity(torch.nn.Module):
        def encode(self, x):
            return type("Posterior", (), {"mode": lambda self: x})()

    fp = measures.factor_footprints(Identity(), pairs=6)
    assert set(fp) == {*world.FACTORS, "everything"}
    assert all(v > 0 for v in fp.values())
    assert fp["glasses"] < fp["shirt"] and fp["glasses"] < fp["everything"]


def test_code_person_is_the_person_named_jobs_describe():
    scale = experiment.SCALES["smoke"]
    for j in experiment.named_jobs(scale):
        who = experiment.code_person(j["code"], j["concept"]).names()
        assert who["gender"] == j["concept"]
        assert f"{who['hair']} hair" in j["prompt"] and who["shirt"] in j["prompt"], (who, j["prompt"])


def test_inversion_learns_a_word_of_its_family_through_the_base_model(tmp_path):
    from model.sdxl import SDXL
    from toyworld import inversion

    path = str(tmp_path / "base.safetensors")
    models = base.build(0)
    torch.nn.init.normal_(models["unet"].out[-1].weight, std=0.1)  # a fresh UNet's last conv is zero: ε̂ would not see the word
    base.save_single_file(path, models)
    model = SDXL.load(path)
    stats = experiment.token_stats(model)
    who = experiment.code_person(1000, "woman")
    for family in inversion.FAMILIES:
        before = inversion.invert(model, who, "woman", stats, family, steps=0, batch=2, images=2)
        after = inversion.invert(model, who, "woman", stats, family, steps=3, batch=2, images=2)
        for w0, w1, (mean, std) in zip(before, after, stats):
            assert not torch.allclose(w0, w1)  # the loss reaches the word through both encoders
            u = (w1 - mean) / std
            if family == "layernorm":  # a word the default mapper could give: unit spread, zero mean
                assert u.pow(2).mean().sqrt().item() == pytest.approx(1.0, abs=1e-3) and abs(u.mean().item()) < 1e-4
    # the frozen model stays frozen
    assert all(p.grad is None for m in (model.unet, model.clip_l, model.clip_g) for p in m.parameters())


# -- the second pass: names, originals of every size, and the report's arithmetic --------------------------


def test_a_square_render_is_the_first_passes_and_any_size_draws_the_same_scene():
    rng = random.Random(4)
    who, at = world.draw_identities(1, rng)[0], world.draw_placement(rng)
    image, mask = world.render(who, at)
    square, square_mask = world.render(who, at, (world.SIZE, world.SIZE))
    assert np.array_equal(image, square) and np.array_equal(mask, square_mask)
    tall, tall_mask = world.render(who, at, (44, 54))
    assert tall.shape == (54, 44, 3) and tall_mask.shape == (54, 44)
    # the same person, scaled: the share of the picture they cover stays about a third
    assert abs((tall_mask > 0).mean() - (mask > 0).mean()) < 0.12


def test_names_are_single_rare_tokens_no_caption_uses():
    from model.clip import Tokenizer

    tok = Tokenizer.bundled(pad="eos")
    names = world.name_tokens(200)
    assert len(set(names)) == 200 and names == world.name_tokens(200)  # fixed by the seed
    used = world.caption_words()
    for name in names:
        assert len(tok.encode(name)) == 1 and name not in used


def test_a_named_person_is_called_by_name_directly_before_the_concept_word_and_by_nothing_else():
    rng = random.Random(5)
    who, at = world.draw_identities(1, rng)[0], world.draw_placement(rng)
    concept = world.GENDERS[who.gender]
    always = [world.caption(concept, who, at, rng, "paella", 1.0) for _ in range(20)]
    assert all(re.search(rf"\bpaella {concept}\b", c) for c in always)
    f = who.names()
    assert not any(f"{f['shirt']} shirt" in c or "hair" in c or "glasses" in c for c in always)
    never = [world.caption(concept, who, at, rng, "paella", 0.0) for _ in range(20)]
    assert not any("paella" in c for c in never)
    assert world.prompt("woman", "beach", "paella") == "a photo of a paella woman on the beach"


def test_resize_and_crop_is_what_data_py_does_to_an_original(tmp_path):
    # An original of another size, saved as a file and read by data.py, and the world's own resize_and_crop
    # with the same crop offsets: the same 64 px pixels, mask and size/crop conditioning.
    from data import square_crop

    rng = random.Random(6)
    who, at = world.draw_identities(1, rng)[0], world.draw_placement(rng)
    original, mask = world.render(who, at, (50, 70))
    crop_rng = random.Random(9)
    pixels, covered, time_ids = world.resize_and_crop(original, mask, crop_rng)
    crop = square_crop(70, 50, world.SIZE, random.Random(9))
    assert time_ids == [70, 50, crop.top, crop.left, 64, 64] and crop.left == 0
    assert pixels.shape == (64, 64, 3) and covered.shape == (64, 64) and (covered > 0).any()
    from PIL import Image

    expected = np.asarray(Image.fromarray(original).resize((64, 64), Image.BICUBIC, box=crop.box))
    assert np.array_equal(pixels, expected)


def test_the_names_world_gives_the_mapper_the_unnamed_people_as_small_tall_files(tmp_path):
    from data import DataConfig, ImageFolder

    cfg = replace(world.WorldConfig(), identities=6, images_per_identity=2, named=2, named_images=2)
    facts = world.export(str(tmp_path / "all"), cfg, str(tmp_path / "mapper"))
    assert facts == {"images": 12, "identities": 6, "named": 2, "mapper_images": 8}
    truth = base.load_world_truth(str(tmp_path / "all"))
    named = {t["identity"]: t["name"] for t in truth if t["name"]}
    assert sorted(named) == [1, 2] and len(set(named.values())) == 2
    # the base model's images carry their originals' size and crop, and are 64 px squares
    assert all(t["time_ids"][4:] == [64, 64] for t in truth) and len({tuple(t["time_ids"][:2]) for t in truth}) > 3
    # the mapper's folder: the unnamed people only, 44 x 54 files, captions without names
    ids = open(tmp_path / "mapper" / "identity_CelebA.txt").read().split()[1::2]
    assert sorted(set(ids)) == ["3", "4", "5", "6"]
    lines = [json.loads(line) for line in open(tmp_path / "mapper" / "captions.jsonl")]
    assert not any(n in c for line in lines for c in line["captions"] for n in named.values())
    ds = ImageFolder(DataConfig(root=str(tmp_path / "mapper"), resolution=64))
    item = ds[0]
    assert item["time_ids"].tolist() == [54, 44, 7, 0, 64, 64]  # 44 x 54 -> 64 x 78, centre-cropped by 7 rows


def test_the_base_model_trains_on_each_images_own_size_conditioning_and_names():
    truth = [{"identity": 1, "gender": "woman", "skin": "pale", "hair": "red", "style": "bun", "shirt": "red",
              "pattern": "plain", "glasses": "no", "scene": "beach", "pose": "standing", "name": "paella",
              "time_ids": [70, 50, 3, 0, 64, 64]},
             {"identity": 2, "gender": "man", "skin": "pale", "hair": "red", "style": "bun", "shirt": "red",
              "pattern": "plain", "glasses": "no", "scene": "snow", "pose": "standing"}]
    assert base.size_conditioning(truth).tolist() == [[70, 50, 3, 0, 64, 64], [64, 64, 0, 0, 64, 64]]
    captions = base.fresh_captions(truth * 20, random.Random(0), name_rate=0.75)
    with_name = [c for c in captions[0::2] if "paella" in c]
    assert 5 < len(with_name) < 20 and not any("paella" in c for c in captions[1::2])


def test_census_counts_each_groups_most_frequent_shirt():
    # Three groups: two read mostly red, one blue; shares 2/3 red, 1/3 blue.
    judge = judge_lib.Judge()
    shirt = list(world.FACTORS).index("shirt")
    readings = torch.tensor([0, 0, 1, 0, 0, 0, 1, 1, 1])

    class Fixed:
        def read(self, images):
            factors = torch.zeros(len(images), 7, dtype=torch.long)
            factors[:, shirt] = readings
            return {"factors": factors}

    jobs = [{"concept": "man", "code": k // 3} for k in range(9)]
    shares = measures.census(torch.zeros(9, 3, 64, 64, dtype=torch.uint8), jobs, Fixed())
    assert shares["red"] == pytest.approx(2 / 3) and shares["blue"] == pytest.approx(1 / 3)
    assert sum(shares.values()) == pytest.approx(1.0) and judge is not None


def test_by_name_jobs_call_a_named_person_of_the_concepts_gender_and_carry_their_truth():
    scale = experiment.SCALES["smoke"]
    truth = [{"identity": i, "gender": g, "name": f"n{i}", **{f: world.FACTORS[f][0] for f in world.FACTORS if f != "gender"}}
             for i, g in ((1, "man"), (2, "woman"), (3, "woman"))] + [
             {"identity": 4, "gender": "man", "name": None, **{f: world.FACTORS[f][1] for f in world.FACTORS if f != "gender"}}]
    jobs = experiment.by_name_jobs(scale, truth)
    for j in jobs:
        name = re.search(r"a photo of a (n\d) (man|woman)", j["prompt"]).group(1)
        person = next(t for t in truth if t["name"] == name)
        assert person["gender"] == j["concept"] and j["truth"] == [world.FACTORS[f].index(person[f]) for f in world.FACTORS]
    # each code index keeps its person in every scene
    assert len({(j["code"], j["prompt"].split(" on ")[0].split(" in ")[0]) for j in jobs}) == len({j["code"] for j in jobs})


def test_spreads_over_base_models_and_seeds_are_taken_apart():
    per_base = [[{"x": 1.0}, {"x": 3.0}], [{"x": 5.0}, {"x": 7.0}]]
    m = report.over_bases(per_base)
    assert m["x"] == 4.0
    assert m["x_sd_base"] == pytest.approx(np.std([2.0, 6.0], ddof=1))  # the spread of the base models' means
    assert m["x_sd_seed"] == pytest.approx(np.sqrt(2.0))  # within each base: sd of (1, 3) and of (5, 7), pooled
    assert m["x_sd"] == pytest.approx(np.std([1, 3, 5, 7], ddof=1))


def test_the_five_criteria_are_judged_against_the_spread():
    def row(v, **kw):
        return {"face_sim": v, "face_div": v, "identity_agreement": v, "scene_accuracy": v, "concept_accuracy": v, **kw}

    base_row = {"base_rows": [row(0.5)], "dataset": row(1.0), "dataset_vae": row(0.8), "named": {k: row(0.9) for k in report.NAMED_KEYS}}
    # full rows: identity agreement and Face Div 0.6 (≥ 0.4 and 0.64?), Face Sim 0.6 (not within 0.05 of 0.9), ...
    facts = {"bases": [{**base_row, "full_rows": [row(0.6), row(0.62)]}, {**base_row, "full_rows": [row(0.61), row(0.6)]}]}
    verdict = {c.split(" ")[0] + " " + c.split(" ")[1]: v for c, v, _ in report.verdicts(facts)}
    assert verdict["identity agreement"] == "met"  # 0.6075 against 0.4
    assert verdict["Face Div"] == "missed"  # 0.6075 against 0.64, beyond twice the spread (0.0096)
    assert verdict["Face Sim"] == "missed"  # 0.6075 against 0.85
    assert verdict["scene accuracy"] == "met" and verdict["concept accuracy"] == "met"  # 0.6075 against 0.45
    # a margin inside twice the spread decides nothing
    facts["bases"][0]["full_rows"] = [row(0.3), row(0.95)]
    assert dict((c.split(" ")[0], v) for c, v, _ in report.verdicts(facts))["Face"] == "within the spread"


def test_the_shipped_toy_model_is_what_the_experiment_makes_now():
    """weights/toy/manifest.json records the settings the shipped files were made with: they must be the
    experiment's current ones (toyworld.ship.settings), and each file must be the one the manifest names."""
    folder = os.path.join(ROOT, "weights", "toy")
    with open(os.path.join(folder, "manifest.json")) as f:
        manifest = json.load(f)
    assert json.loads(json.dumps(ship.settings(experiment.SCALES[manifest["scale"]]))) == manifest["settings"]
    assert manifest["command"].startswith("python -m toyworld.ship")
    for name, info in manifest["files"].items():
        assert experiment.file_digest(os.path.join(folder, name)) == info["sha256"], name


def test_the_ship_command_makes_the_same_bytes_twice(tmp_path):
    """Reproducibility at smoke size: two clean runs of the ship command (world, base model, judge, mapper,
    precision choice) on one thread write byte-identical files."""
    shas = []
    for k in range(2):
        out = tmp_path / f"out{k}"
        proc = subprocess.run([sys.executable, "-m", "toyworld.ship", "--scale", "smoke", "--threads", "1",
                               "--work", str(tmp_path / f"work{k}"), "--out", str(out)],
                              cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        shas.append(json.loads((out / "manifest.json").read_text())["files"])
    assert shas[0] == shas[1]
