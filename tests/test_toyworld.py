"""The toy world: its people, captions and masks, the base model's pieces, and the whole experiment at smoke size."""

import json
import os
import random
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from toyworld import base, experiment, judge as judge_lib, world

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
    from data import CelebA, DataConfig

    facts = world.export(str(tmp_path), world.WorldConfig(identities=5, images_per_identity=3))
    assert facts == {"images": 15, "identities": 5}
    ds = CelebA(DataConfig(root=str(tmp_path), resolution=64))
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
    m = experiment.score(reading, [[0, 1], [2, 3]], [0, 1, 2, 3])
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
    m = experiment.score({"embedding": emb, "factors": factors, "scene": torch.tensor([0, 0, 0])}, [[0, 1, 2]], [0, 0, 0])
    assert m["face_sim"] == pytest.approx(1 / 3, abs=1e-9)
    # and all seven factors agree in one of the three pairs (glasses, column 6, split the others)
    assert m["identity_agreement"] == pytest.approx(1 / 3) and m["agree_glasses"] == pytest.approx(1 / 3)


def test_every_ablation_row_is_a_train_py_flag_set():
    import train

    for row in experiment.ROWS:
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
    # --jobs 2: the two seeds' mapper runs train side by side, as on the 2-core machine
    proc = subprocess.run([sys.executable, "-m", "toyworld", "--scale", "smoke", "--rows", "core", "--jobs", "2",
                           "--work", str(tmp_path / "work"), "--results", str(results)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = results.read_text()
    for needle in ("python -m toyworld --scale smoke --rows core --jobs 2", "## Is CoCoIns working here?", "| CoCoIns (full) |",
                   "| Dataset (same person = same identity label) |", "## The judge"):
        assert needle in text
    raw = json.loads(text.split("```json")[1].split("```")[0])
    for row in ("dataset", "base", "full"):
        assert 0 <= raw[row]["scene_accuracy"] <= 1 and np.isfinite(raw[row]["face_div"])
    # The curve's points are the checkpoints a watcher copies while train.py runs (a poll: at full
    # scale checkpoints are a minute apart; at smoke size two may land within one poll, so only the
    # final one is certain).
    assert len(raw["full_rows"]) == 2 and len(raw["curve"]) >= 1 and raw["curve"][-1]["step"] == 2
    assert proc.stdout.count("training CoCoIns (full)") == 2  # both seeds, in the parallel pass
    for name in ("contact_base.png", "contact_cocoins.png", "curve_loss.png", "curve_face_sim.png", "vae_reconstructions.png"):
        assert (tmp_path / "figures" / name).is_file(), name
    # A rerun reuses the world, the base model, the judge and the trained mappers.
    again = subprocess.run([sys.executable, "-m", "toyworld", "--scale", "smoke", "--rows", "core",
                            "--work", str(tmp_path / "work"), "--results", str(results)],
                           cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0
    assert "training " not in again.stdout and "vae step" not in again.stdout and "judge step" not in again.stdout


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

    world.export(str(tmp_path), world.WorldConfig(identities=4, images_per_identity=1))
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
    args = ["--data", exp.data, "--weights", exp.weights, "--out", "x", "--steps", str(smoke.mapper_steps),
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
        s = experiment.pseudo_word_stats(f, codes)
        assert s["w_rms"] == pytest.approx(gain, rel=1e-3) and s["w_cos"] < 0.9
        # A mapper that ignores z (its first layer's weight zeroed, only its bias left) gives every
        # code one word: cosine 1.
        torch.nn.init.zeros_(f.layers[0].weight)
        torch.nn.init.normal_(f.layers[0].bias)
        assert experiment.pseudo_word_stats(f, codes)["w_cos"] == pytest.approx(1.0, abs=1e-5)


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
    assert experiment.pseudo_word_stats(f, [1, 2, 3])["w_dims"] == pytest.approx(2.0, rel=0.15)
    # A full-rank W: the words vary in all 8 directions z has.
    with torch.no_grad():
        f.heads[0].proj.weight.copy_(torch.linalg.qr(torch.randn(16, 8))[0])
    assert experiment.pseudo_word_stats(f, [1, 2, 3])["w_dims"] == pytest.approx(8.0, rel=0.15)


def test_factor_footprints_measure_each_factor_alone():
    # A stand-in VAE whose "latent" is the image itself: the footprint of a factor is then how
    # much of the picture it repaints; a shirt covers far more than a pair of glasses.
    class Identity(torch.nn.Module):
        def encode(self, x):
            return type("Posterior", (), {"mode": lambda self: x})()

    fp = experiment.factor_footprints(Identity(), pairs=6)
    assert set(fp) == {*world.FACTORS, "everything"}
    assert all(v > 0 for v in fp.values())
    assert fp["glasses"] < fp["shirt"] and fp["glasses"] < fp["everything"]


def test_code_person_is_the_person_named_jobs_describe():
    scale = experiment.SCALES["smoke"]
    for j in experiment.named_jobs(scale):
        who = experiment.code_person(j["code"], j["concept"]).names()
        assert who["gender"] == j["concept"]
        assert f"{who['hair']} hair" in j["prompt"] and who["shirt"] in j["prompt"], (who, j["prompt"])


def test_word_table_gives_each_code_its_own_words_and_knows_no_others():
    from model.mapper import code_to_z
    from toyworld import inversion

    heads = [type("Head", (), {"token_mean": torch.zeros(4), "token_std": torch.ones(4)})()]
    words = [(torch.full((4,), 1.0), torch.full((6,), 2.0)), (torch.full((4,), 3.0), torch.full((6,), 4.0))]
    table = inversion.WordTable([7, 9], words, heads)
    w_l, w_g = table(torch.stack([code_to_z(9, 8), code_to_z(7, 8), code_to_z(9, 8)]))
    assert w_l[:, 0].tolist() == [3.0, 1.0, 3.0] and w_g[:, 0].tolist() == [4.0, 2.0, 4.0]
    with pytest.raises(IndexError):
        table(code_to_z(8, 8)[None])


def test_inversion_learns_a_word_of_its_family_through_the_base_model(tmp_path):
    from model.sdxl import SDXL
    from toyworld import inversion

    path = str(tmp_path / "base.safetensors")
    models = base.build(0)
    torch.nn.init.normal_(models["unet"].out[-1].weight, std=0.1)  # a fresh UNet's last conv is zero: ε̂ would not see the word
    base.save_single_file(path, models)
    model = SDXL.load(path)
    heads = inversion.token_stats(model)
    who = experiment.code_person(1000, "woman")
    for family in inversion.FAMILIES:
        before = inversion.invert(model, who, "woman", heads, family, steps=0, batch=2, images=2)
        after = inversion.invert(model, who, "woman", heads, family, steps=3, batch=2, images=2)
        for w0, w1, h in zip(before, after, heads):
            assert not torch.allclose(w0, w1)  # the loss reaches the word through both encoders
            u = (w1 - h.token_mean) / h.token_std
            if family == "layernorm":  # a word the default mapper could give: unit spread, zero mean
                assert u.pow(2).mean().sqrt().item() == pytest.approx(1.0, abs=1e-3) and abs(u.mean().item()) < 1e-4
    # the frozen model stays frozen
    assert all(p.grad is None for m in (model.unet, model.clip_l, model.clip_g) for p in m.parameters())
