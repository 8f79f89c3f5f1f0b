"""Identities that travel (model/export.py, sample.py --save-embedding / --info).

A code exported as an SDXL textual-inversion embedding must draw in diffusers what `sample.py --code`
draws; a mapper file must say what it is, old files included; another base model gets a warning.
The tiny SDXL of tests/tiny_sdxl.py (random weights, SDXL's topology and, like SDXL's real configs,
`eos_token_id: 2` in both text encoder configs) and a random mapper stand in for the real ones.
"""

import hashlib
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

import sample
from model import __version__, clip, export
from model.checkpoint import load_mapper, save_mapper
from model.errors import UserError
from model.mapper import Mapper, MapperConfig, code_to_z, embedding_stats, insert_subjects
from model.sdxl import SDXL
from tests.tiny_sdxl import save_tiny_sdxl

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE, STEPS, SEED = 64, 3, 0
TOKEN = "<person42>"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny SDXL in both layouts, a mapper that records what train.py records, and an old one that does not."""
    root = str(tmp_path_factory.mktemp("export"))
    _, folder, single = save_tiny_sdxl(root)
    model = SDXL.load(single)
    stats = [embedding_stats(model.clip_l.text_model.embeddings.token_embedding.weight),
             embedding_stats(model.clip_g.token_embedding.weight)]
    f = Mapper(MapperConfig(z_dim=16, depth=2, hidden=32, token_widths=(64, 128)), stats)
    mapper, old = os.path.join(root, "mapper.safetensors"), os.path.join(root, "old.safetensors")
    save_mapper(mapper, f, export.training_metadata(7, {"steps": 10, "lr": 1e-4}, export.base_model_identity(single),
                                                    {"woman": 4, "man": 2}))
    save_mapper(old, f)  # a file as train.py wrote it before the metadata: config and weights only
    return dict(model=model, folder=folder, single=single, mapper=mapper, old=old)


def words(mapper_path, code):
    """f(z) of a code: the pseudo-words sample.py inserts, (w_l, w_g), each (1, D)."""
    f = load_mapper(mapper_path)
    with torch.no_grad():
        return f(code_to_z(code, f.config.z_dim)[None])


@pytest.fixture
def no_sdxl(monkeypatch):
    """Export and --info need the mapper alone: loading SDXL fails the test."""
    monkeypatch.setattr(SDXL, "load", lambda *a, **k: pytest.fail("SDXL was loaded"))


# ----------------------------------------------------------------------------------------------
# The file
# ----------------------------------------------------------------------------------------------


def test_an_exported_code_is_an_sdxl_embedding_of_its_two_pseudo_words(tiny, tmp_path, no_sdxl, capsys):
    path = tmp_path / "person42.safetensors"
    sample.main(["--mapper", tiny["mapper"], "--code", "42", "--save-embedding", str(path)])  # no --prompt
    assert capsys.readouterr().out.split() == [str(path)]
    tensors = load_file(path)
    assert set(tensors) == {"clip_l", "clip_g"}
    w_l, w_g = words(tiny["mapper"], 42)
    assert tensors["clip_l"].shape == (1, 64) and tensors["clip_g"].shape == (1, 128)
    assert torch.equal(tensors["clip_l"], w_l) and torch.equal(tensors["clip_g"], w_g)
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    assert meta["mapper_sha256"] == hashlib.sha256(open(tiny["mapper"], "rb").read()).hexdigest()
    assert meta["code"] == "42" and meta["cocoins_version"] == __version__
    assert meta["concept"] == "woman, man"  # no --concept, no --prompt: the words the mapper was trained on
    assert meta["base_model"] == export.read_metadata(tiny["mapper"])["base_model"]


def test_several_codes_write_one_file_each_named_by_its_code(tiny, tmp_path, no_sdxl):
    pattern = str(tmp_path / "embeddings" / "person{code}.safetensors")
    sample.main(["--mapper", tiny["mapper"], "--code", "1", "--code", "2", "--concept", "man", "--concept", "woman",
                 "--save-embedding", pattern])
    for code, concept in ((1, "man"), (2, "woman")):
        path = tmp_path / "embeddings" / f"person{code}.safetensors"
        assert torch.equal(load_file(path)["clip_g"], words(tiny["mapper"], code)[1])
        with safe_open(path, "pt") as f:
            assert (f.metadata()["code"], f.metadata()["concept"]) == (str(code), concept)
    assert sorted(os.listdir(tmp_path / "embeddings")) == ["person1.safetensors", "person2.safetensors"]


def test_a_prompt_names_the_concept_and_the_images_are_drawn_too(tiny, tmp_path):
    path, png = tmp_path / "e.safetensors", tmp_path / "a.png"
    sample.main(["--weights", tiny["single"], "--mapper", tiny["mapper"], "--code", "3", "--save-embedding", str(path),
                 "--prompt", "a man reading", "--out", str(png), "--steps", "1", "--width", "8", "--height", "8",
                 "--device", "cpu"])
    with safe_open(path, "pt") as f:
        assert f.metadata()["concept"] == "man"
    assert png.is_file()


@pytest.mark.parametrize("which, flags, says", [
    ("mapper", ["--code", 1, "--code", 2, "--save-embedding", "person.safetensors"], "names one file but 2 --code"),
    ("mapper", ["--code", 1, "--save-embedding", "person.pt"], "name a .safetensors file"),
    ("mapper", ["--save-embedding", "person.safetensors"], "--save-embedding needs a --code"),
    ("mapper", ["--code", 1, "--code", 2, "--concept", "man", "--save-embedding", "p{code}.safetensors"],
     "2 --code but 1 --concept"),
    ("old", ["--code", 1, "--save-embedding", "p.safetensors"], "does not record the concept words"),
    ("mapper", ["--code", -1, "--save-embedding", "p.safetensors"], "a code must be a whole number"),
    ("mapper", [], "give a --prompt to draw"),
])
def test_export_mistakes_are_one_sentence_and_write_nothing(tiny, tmp_path, monkeypatch, no_sdxl, which, flags, says):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=says):
        sample.main(["--mapper", tiny[which], *map(str, flags)])
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------------------------
# Proof against diffusers: its SDXL pipeline, the file loaded into both text encoders
# ----------------------------------------------------------------------------------------------


def diffusers_with(folder, embedding):
    """diffusers' SDXL pipeline (DDIM configured as SDXL's, saved by tiny_sdxl) with the embedding loaded
    as a user loads an SDXL embedding: each key into its own text encoder and tokenizer."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(folder, add_watermarker=False)  # float32, as saved
    state = load_file(embedding)
    pipe.load_textual_inversion(state["clip_l"], token=TOKEN, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(state["clip_g"], token=TOKEN, text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    return pipe


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("embedding") / "person42.safetensors")
    sample.main(["--mapper", tiny["mapper"], "--code", "42", "--concept", "woman", "--save-embedding", path])
    return path


def test_the_tiny_text_encoders_carry_sdxls_eos_token_id_2(tiny):
    # SDXL's text_encoder/config.json and text_encoder_2/config.json say eos_token_id 2; transformers then
    # reads the pooled output at the largest token id, the rule the proof below has to meet.
    from transformers import CLIPTextConfig

    for sub in ("text_encoder", "text_encoder_2"):
        assert CLIPTextConfig.from_pretrained(os.path.join(tiny["folder"], sub)).eos_token_id == 2


def test_diffusers_draws_the_exported_identity_as_sample_py_does(tiny, exported, tmp_path):
    ours_png = tmp_path / "ours.png"
    sample.main(["--weights", tiny["single"], "--mapper", tiny["mapper"], "--code", "42", "--prompt", "a woman reading",
                 "--seed", str(SEED), "--steps", str(STEPS), "--width", str(SIZE), "--height", str(SIZE),
                 "--dtype", "float32", "--device", "cpu", "--out", str(ours_png)])
    ours = np.asarray(Image.open(ours_png).convert("RGB")).astype(int)
    pipe = diffusers_with(tiny["folder"], exported)

    def draw():
        out = pipe(prompt=f"a {TOKEN} woman reading", num_inference_steps=STEPS, guidance_scale=5.0, width=SIZE,
                   height=SIZE, output_type="np", generator=torch.Generator("cpu").manual_seed(SEED))
        return (out.images[0] * 255).round().astype(int)

    assert ours.std() > 10  # a real image, not a flat one that would match anything flat
    # As loaded, bigG's pooled vector is read at the pseudo-word (the largest id), not at the EOS.
    assert np.abs(draw() - ours).max() > 1
    # The workaround: read it at the first EOS, as SDXL does.
    pipe.text_encoder_2.text_model.eos_token_id = pipe.tokenizer_2.eos_token_id
    assert np.abs(draw() - ours).max() <= 1


def test_without_the_workaround_transformers_reads_bigGs_pooled_output_at_the_pseudo_word(tiny, exported):
    pipe = diffusers_with(tiny["folder"], exported)
    ids = pipe.tokenizer_2([f"a {TOKEN} woman reading"], padding="max_length", max_length=77, return_tensors="pt")
    ids = ids.input_ids
    word, eos = 2, 5  # BOS a <person42> woman reading EOS
    assert ids[0, :6].tolist() == [clip.BOS_ID, 320, 49408, 2308, 2337, clip.EOS_ID]
    # Ours: "a woman reading" with code 42's bigG word inserted before "woman" (sample.py's path).
    model = tiny["model"]
    plain = model.tok_g(["a woman reading"])
    e_hat, eos_hat = insert_subjects(model.clip_g.embed(plain), clip.eos_positions(plain), plain, model.tok_g,
                                     [(words(tiny["mapper"], 42)[1][0], "woman")], ["a woman reading"])
    assert eos_hat.tolist() == [eos]
    read_at = {p: model.clip_g(e_hat, torch.tensor([p])).pooled for p in (word, eos)}
    with torch.no_grad():
        as_loaded = pipe.text_encoder_2(ids).text_embeds
        pipe.text_encoder_2.text_model.eos_token_id = pipe.tokenizer_2.eos_token_id
        with_workaround = pipe.text_encoder_2(ids).text_embeds
    torch.testing.assert_close(as_loaded, read_at[word], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(with_workaround, read_at[eos], atol=1e-5, rtol=1e-5)
    assert (read_at[word] - read_at[eos]).abs().max() > 1e-2


# Prompts written both ways: with the token (diffusers) and with --code (sample.py), spacing, case
# and punctuation varied around the token.
SPELLINGS = [
    ("a <person42> woman reading", "a woman reading"),
    ("A <person42> Woman, reading.", "A Woman, reading."),
    ("a <person42>woman reading", "a woman reading"),
    ("a<person42> woman reading", "a woman reading"),
    ("a  <person42>  woman's portrait", "a woman's portrait"),
    ("(a <person42> woman:1.2)", "(a woman:1.2)"),
    ("red " * 73 + "<person42> woman", "red " * 73 + "woman"),  # 75 tokens with the word: the limit
]


def test_the_two_ways_of_writing_the_prompt_tokenise_alike(tiny, exported):
    pipe, model = diffusers_with(tiny["folder"], exported), tiny["model"]
    for tokenizer, ours in ((pipe.tokenizer, model.tok_l), (pipe.tokenizer_2, model.tok_g)):
        for with_token, with_code in SPELLINGS:
            theirs = tokenizer(with_token, padding="max_length", max_length=77, truncation=True).input_ids
            ids = ours([with_code])
            # the token ids of sample.py's path: the word's id goes where insert() puts the word
            w = torch.full((1,), 49408.0)
            e_hat, _ = insert_subjects(ids[..., None].float(), clip.eos_positions(ids), ids, ours, [(w, "woman")],
                                       [with_code])
            assert theirs == e_hat[0, :, 0].long().tolist(), with_token


def test_past_the_token_limit_diffusers_drops_the_concept_and_sample_py_refuses(tiny, exported):
    with_token, with_code = "red " * 74 + "<person42> woman", "red " * 74 + "woman"
    pipe, model = diffusers_with(tiny["folder"], exported), tiny["model"]
    theirs = pipe.tokenizer(with_token, padding="max_length", max_length=77, truncation=True).input_ids
    assert theirs[-2:] == [49408, clip.EOS_ID]  # "woman" cut: the word stands before nothing
    ids = model.tok_l([with_code])
    with pytest.raises(UserError, match="past CLIP's 77-token limit"):
        insert_subjects(ids[..., None].float(), clip.eos_positions(ids), ids, model.tok_l,
                        [(torch.zeros(1), "woman")], [with_code])


# ----------------------------------------------------------------------------------------------
# A mapper that says what it is
# ----------------------------------------------------------------------------------------------


def test_info_prints_what_the_mapper_records(tiny, no_sdxl, capsys):
    sample.main(["--mapper", tiny["mapper"], "--info"])
    text = " ".join(capsys.readouterr().out.split())
    digest = hashlib.sha256(open(tiny["single"], "rb").read()).hexdigest()
    assert f"base model tiny_sdxl.safetensors ({os.path.getsize(tiny['single']):,} bytes, sha256 {digest})" in text
    assert "concepts woman (4 images), man (2 images)" in text and "steps done 7 of 10" in text
    assert f"version written by cocoins {__version__}" in text and "training settings lr=0.0001, steps=10" in text
    assert hashlib.sha256(open(tiny["mapper"], "rb").read()).hexdigest() in text
    assert "not recorded" not in text


def test_an_old_mapper_still_loads_and_info_says_what_it_lacks(tiny, no_sdxl, capsys):
    assert load_mapper(tiny["old"]).config.token_widths == (64, 128)
    sample.main(["--mapper", tiny["old"], "--info"])
    out = capsys.readouterr().out
    for field in ("version", "base model", "concepts", "steps done", "training settings"):
        assert any(line.startswith(field) and line.endswith("not recorded") for line in out.splitlines()), field
    assert "does not record its version, base model, concepts, steps done, training settings" in " ".join(out.split())


def test_another_base_model_gets_a_one_line_warning_not_a_refusal(tiny, tmp_path, capsys):
    def draw(weights):
        png = tmp_path / "a.png"
        sample.main(["--weights", weights, "--mapper", tiny["mapper"], "--code", "1", "--prompt", "a woman",
                     "--out", str(png), "--steps", "1", "--width", "8", "--height", "8", "--device", "cpu"])
        assert png.is_file()
        png.unlink()
        return [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning")]

    assert draw(tiny["single"]) == []  # the model it was trained on
    # The same weights in the diffusers layout are other files: by name and digest another model.
    (warning,) = draw(tiny["folder"])
    assert warning.startswith("warning: this mapper was trained on tiny_sdxl.safetensors (")
    assert "not on diffusers (" in warning and "fine-tune" in warning


def test_the_base_model_is_known_by_digest_when_small_and_by_name_and_size_when_not(tiny, tmp_path, monkeypatch):
    identity = export.base_model_identity(tiny["single"])
    assert identity["sha256"] == hashlib.sha256(open(tiny["single"], "rb").read()).hexdigest()
    renamed = tmp_path / "copy.safetensors"
    renamed.write_bytes(open(tiny["single"], "rb").read())
    assert export.same_base_model(identity, export.base_model_identity(str(renamed)))  # one digest
    monkeypatch.setattr(export, "HASH_LIMIT", 1000)  # as for SDXL's 6.9 GB: no digest
    big = export.base_model_identity(tiny["single"])
    assert "sha256" not in big and big["bytes"] == os.path.getsize(tiny["single"])
    assert export.same_base_model(big, export.base_model_identity(tiny["single"]))
    assert not export.same_base_model(big, export.base_model_identity(str(renamed)))  # other name


def test_a_hub_cache_snapshot_is_named_by_its_repository(tmp_path):
    snapshot = tmp_path / "models--stabilityai--stable-diffusion-xl-base-1.0" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "sd_xl_base_1.0.safetensors").write_bytes(b"")
    assert export.base_model_name(str(snapshot)) == "stabilityai/stable-diffusion-xl-base-1.0"
    assert export.base_model_name(str(snapshot / "sd_xl_base_1.0.safetensors")) == (
        "stabilityai/stable-diffusion-xl-base-1.0/sd_xl_base_1.0.safetensors")
    assert export.hub_base_model({"name": "sd_xl_base_1.0.safetensors", "bytes": 1}) == (
        "stabilityai/stable-diffusion-xl-base-1.0")
    assert export.hub_base_model({"name": "my_finetune.safetensors", "bytes": 1}) is None


def test_every_new_flag_is_in_the_help_and_the_readme_table(capsys):
    with pytest.raises(SystemExit):
        sample.parse_args(["--help"])
    help_text = capsys.readouterr().out
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    table = readme.split("## `sample.py`", 1)[1].split("\n## ", 1)[0]
    for flag in ("--save-embedding", "--info"):
        assert flag in help_text and f"| `{flag}" in table, flag
