"""model/checkpoint.py through SDXL.load: every layout people have on disk, finding weights, naming what is wrong.

One tiny SDXL (tests/tiny_sdxl.py, random weights) is saved once as a diffusers folder and as an
official-layout single file; each test derives the variant it needs from those files (fp16
variants, shards, optional and extra keys, replacement VAEs, foreign checkpoints, fake Hugging
Face caches) and checks that the loader gives exactly the model it should, or one sentence saying
what the file is. Whole-image parity with diffusers lives in tests/test_pipeline.py.
"""

import json
import os
import shutil
import weakref

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from model import checkpoint
from model.checkpoint import PREFIX, CheckpointError, Part, read_part
from model.sdxl import SDXL
from tests.tiny_sdxl import _randomize, save_tiny_sdxl

MODELS = ("unet", "vae", "clip_l", "clip_g")
# Each diffusers component file, relative to the folder.
COMPONENT_FILES = {
    "unet": "unet/diffusion_pytorch_model",
    "vae": "vae/diffusion_pytorch_model",
    "clip_l": "text_encoder/model",
    "clip_g": "text_encoder_2/model",
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(diffusers pipeline, diffusers folder, single file, our model loaded from the folder)."""
    pipe, folder, single = save_tiny_sdxl(str(tmp_path_factory.mktemp("tiny_sdxl")))
    return pipe, folder, single, SDXL.load(folder)


def weights_of(model: SDXL) -> dict[str, torch.Tensor]:
    return {f"{m}.{k}": v for m in MODELS for k, v in getattr(model, m).state_dict().items()}


def assert_same_weights(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def derived_folder(src: str, dst: str, files: dict[str, dict[str, dict]]) -> str:
    """A diffusers folder at `dst` whose component `m` is written as `files[m]` ({file name:
    tensors}) and whose other components link to `src`'s files."""
    for m, stem in COMPONENT_FILES.items():
        os.makedirs(os.path.join(dst, os.path.dirname(stem)), exist_ok=True)
        if m in files:
            for name, tensors in files[m].items():
                path = os.path.join(dst, os.path.dirname(stem), name)
                if name.endswith(".json"):
                    with open(path, "w") as f:
                        json.dump(tensors, f)
                else:
                    save_file(tensors, path)
        else:
            os.symlink(os.path.join(src, stem + ".safetensors"), os.path.join(dst, stem + ".safetensors"))
    return dst


def component(folder: str, m: str) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(folder, COMPONENT_FILES[m] + ".safetensors"))


def half(tensors: dict) -> dict:
    return {k: v.half() for k, v in tensors.items()}


def rounded_to_fp16(weights: dict) -> dict:
    return {k: v.half().float() if v.is_floating_point() else v for k, v in weights.items()}


# ----------------------------------------------------------------------------------------------
# Layouts that must give the same model
# ----------------------------------------------------------------------------------------------

def test_fp16_variant_folder_loads_the_fp16_rounded_weights(tiny, tmp_path):
    _, folder, _, ref = tiny
    fp16 = {m: {os.path.basename(stem) + ".fp16.safetensors": half(component(folder, m))}
            for m, stem in COMPONENT_FILES.items()}
    model = SDXL.load(derived_folder(folder, str(tmp_path), fp16))
    assert_same_weights(weights_of(model), rounded_to_fp16(weights_of(ref)))


def test_folder_mixing_fp16_and_full_precision_components_loads(tiny, tmp_path):
    _, folder, _, ref = tiny
    fp16 = {m: {os.path.basename(COMPONENT_FILES[m]) + ".fp16.safetensors": half(component(folder, m))}
            for m in ("unet", "clip_l")}
    got, want = weights_of(SDXL.load(derived_folder(folder, str(tmp_path), fp16))), weights_of(ref)
    rounded = rounded_to_fp16(want)
    assert_same_weights(got, {k: rounded[k] if k.split(".")[0] in ("unet", "clip_l") else v for k, v in want.items()})


def test_full_precision_files_win_over_fp16_variants_beside_them(tiny, tmp_path):
    _, folder, _, ref = tiny
    # fp16 files of zeros next to the full-precision ones: loading them would zero the model.
    files = {m: {os.path.basename(stem) + ".safetensors": component(folder, m),
                 os.path.basename(stem) + ".fp16.safetensors": {k: torch.zeros_like(v).half() for k, v in component(folder, m).items()}}
             for m, stem in COMPONENT_FILES.items()}
    assert_same_weights(weights_of(SDXL.load(derived_folder(folder, str(tmp_path), files))), weights_of(ref))


def sharded_unet(folder: str) -> dict:
    sd = component(folder, "unet")
    names = sorted(sd)
    halves = {"diffusion_pytorch_model-00001-of-00002.safetensors": names[: len(names) // 2],
              "diffusion_pytorch_model-00002-of-00002.safetensors": names[len(names) // 2:]}
    files = {shard: {k: sd[k] for k in keys} for shard, keys in halves.items()}
    files["diffusion_pytorch_model.safetensors.index.json"] = {
        "metadata": {"total_size": sum(v.numel() * v.element_size() for v in sd.values())},
        "weight_map": {k: shard for shard, keys in halves.items() for k in keys},
    }
    return files


def test_sharded_component_loads_the_same_model(tiny, tmp_path):
    _, folder, _, ref = tiny
    model = SDXL.load(derived_folder(folder, str(tmp_path), {"unet": sharded_unet(folder)}))
    assert_same_weights(weights_of(model), weights_of(ref))


def test_missing_shard_is_named(tiny, tmp_path):
    _, folder, _, _ = tiny
    files = sharded_unet(folder)
    del files["diffusion_pytorch_model-00002-of-00002.safetensors"]
    with pytest.raises(CheckpointError, match="00002-of-00002.safetensors is missing"):
        SDXL.load(derived_folder(folder, str(tmp_path), {"unet": files}))


# The official file's optional tensors (tests/data/sdxl_keys.json "optional_single_file_keys"), and
# the extras the reference says to ignore.
OPTIONAL = {
    "conditioner.embedders.0.transformer.text_model.embeddings.position_ids": torch.arange(77)[None],
    "conditioner.embedders.1.model.logit_scale": torch.tensor(4.6052),
}
EXTRAS = {
    "without_optional_keys": {},
    "with_optional_keys": OPTIONAL,
    "with_denoiser_sigmas": {**OPTIONAL, "denoiser.sigmas": torch.linspace(0.03, 14.6, 1000)},
    "with_ema_copy": {"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(1000, dtype=torch.int32)},
}


@pytest.mark.parametrize("extra", EXTRAS.values(), ids=EXTRAS.keys())
def test_single_file_loads_the_same_model_as_the_folder(tiny, tmp_path, extra):
    _, _, single, ref = tiny
    path = str(tmp_path / "sdxl.safetensors")
    save_file({**load_file(single), **extra}, path)
    assert_same_weights(weights_of(SDXL.load(path)), weights_of(ref))


def test_unknown_tensor_outside_the_four_models_is_an_error_naming_it(tiny, tmp_path):
    _, _, single, _ = tiny
    path = str(tmp_path / "sdxl.safetensors")
    save_file({**load_file(single), "embedding_manager.embedder.x": torch.zeros(3)}, path)
    with pytest.raises(CheckpointError, match=r"1 tensors outside SDXL's four models \(embedding_manager\.embedder\.x\)"):
        SDXL.load(path)


def test_unknown_tensor_inside_a_model_prefix_is_an_error_naming_it(tiny, tmp_path):
    _, _, single, _ = tiny
    path = str(tmp_path / "sdxl.safetensors")
    save_file({**load_file(single), "model.diffusion_model.extra.weight": torch.zeros(3)}, path)
    with pytest.raises(CheckpointError, match=r"unexpected \(extra\.weight\)"):
        SDXL.load(path)


# ----------------------------------------------------------------------------------------------
# --vae
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def other_vae(tiny, tmp_path_factory):
    """A second tiny VAE with other random weights: (diffusers folder, its file, our direct build)."""
    from diffusers import AutoencoderKL

    pipe = tiny[0]
    v = AutoencoderKL.from_config(pipe.vae.config)
    _randomize(v, torch.Generator().manual_seed(1))
    folder = str(tmp_path_factory.mktemp("other_vae"))
    v.save_pretrained(folder, safe_serialization=True)
    file = os.path.join(folder, "diffusion_pytorch_model.safetensors")
    return folder, file, checkpoint.build("vae", checkpoint.from_diffusers("vae", load_file(file)))


@pytest.mark.parametrize("layout", ["diffusers_folder", "diffusers_file", "official_with_prefix", "official_without_prefix"])
def test_vae_flag_replaces_the_vae_in_either_layout(tiny, other_vae, tmp_path, layout):
    _, _, single, ref = tiny
    folder, file, direct = other_vae
    path = {"diffusers_folder": folder, "diffusers_file": file}.get(layout)
    if path is None:
        prefix = PREFIX["vae"] if layout == "official_with_prefix" else ""
        path = str(tmp_path / "vae.safetensors")
        save_file({prefix + k: v.contiguous() for k, v in direct.state_dict().items()}, path)
    model = SDXL.load(single, vae_path=path)
    assert_same_weights({k: v for k, v in weights_of(model).items() if not k.startswith("vae.")},
                        {k: v for k, v in weights_of(ref).items() if not k.startswith("vae.")})
    z = torch.randn(1, 4, 8, 8)
    assert torch.equal(model.vae.decode(z), direct.decode(z))
    assert not torch.allclose(model.vae.decode(z), ref.vae.decode(z), atol=1e-2)


def test_vae_flag_rejects_a_file_without_an_autoencoder(tiny):
    _, folder, single, _ = tiny
    with pytest.raises(CheckpointError, match="not an autoencoder checkpoint"):
        SDXL.load(single, vae_path=os.path.join(folder, "text_encoder", "model.safetensors"))


# ----------------------------------------------------------------------------------------------
# Streaming
# ----------------------------------------------------------------------------------------------

def test_read_part_gives_the_requested_dtype_and_keeps_integer_tensors(tiny, tmp_path):
    _, _, single, _ = tiny
    path = str(tmp_path / "sdxl.safetensors")
    save_file({**load_file(single), **OPTIONAL}, path)
    sd = read_part(Part([path], PREFIX["clip_l"]), "cpu", torch.bfloat16)
    assert sd["text_model.embeddings.position_ids"].dtype == torch.int64
    floats = [v for k, v in sd.items() if k != "text_model.embeddings.position_ids"]
    assert floats and all(v.dtype == torch.bfloat16 for v in floats)


def test_read_part_holds_at_most_one_tensor_in_the_files_dtype(tiny, monkeypatch):
    """Each tensor is cast before the next is read, so host memory stays near one tensor of the
    file's dtype (a full file read first would hold them all)."""
    _, _, single, _ = tiny
    real_open = checkpoint.safe_open
    raw, alive_at_read = [], []

    class SpyFile:
        def __init__(self, *args, **kwargs):
            self.f = real_open(*args, **kwargs)

        def __enter__(self):
            self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def get_tensor(self, name):
            alive_at_read.append(sum(r() is not None for r in raw))
            t = self.f.get_tensor(name)
            raw.append(weakref.ref(t))
            return t

    monkeypatch.setattr(checkpoint, "safe_open", SpyFile)
    sd = read_part(Part([single], PREFIX["unet"]), "cpu", torch.bfloat16)
    assert len(raw) == len(sd) > 100
    assert max(alive_at_read) == 0


# ----------------------------------------------------------------------------------------------
# Files that are not SDXL base: one sentence each
# ----------------------------------------------------------------------------------------------

def _write(tensors):
    def make(tmp, single, folder):
        path = os.path.join(tmp, "model.safetensors")
        save_file(tensors, path)
        return path
    return make


def _refiner(tmp, single, folder):
    # The refiner: bigG alone, as embedders.0, and a UNet whose label embedding takes 2560 features.
    sd = {k.replace("conditioner.embedders.1.", "conditioner.embedders.0."): v for k, v in load_file(single).items()
          if not k.startswith(PREFIX["clip_l"])}
    sd["model.diffusion_model.label_emb.0.0.weight"] = torch.zeros(8, 2560)
    path = os.path.join(tmp, "sd_xl_refiner_1.0.safetensors")
    save_file(sd, path)
    return path


def _inpainting(tmp, single, folder):
    # SDXL inpainting: the UNet's first convolution takes 9 channels (latent, mask, masked image)
    sd = load_file(single)
    w = sd["model.diffusion_model.input_blocks.0.0.weight"]
    sd["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(w.shape[0], 9, *w.shape[2:])
    path = os.path.join(tmp, "sd_xl_base_1.0_inpainting_0.1.safetensors")
    save_file(sd, path)
    return path


def _truncated(tmp, single, folder):
    path = os.path.join(tmp, "sd_xl_base_1.0.safetensors")
    with open(single, "rb") as f, open(path, "wb") as out:
        out.write(f.read(os.path.getsize(single) // 2))
    return path


def _random_bytes(tmp, single, folder):
    path = os.path.join(tmp, "model.safetensors")
    with open(path, "wb") as f:
        f.write(torch.randint(0, 256, (4096,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)).numpy().tobytes())
    return path


def _ckpt(tmp, single, folder):
    path = os.path.join(tmp, "sd_xl_base_1.0.ckpt")
    torch.save({"state_dict": {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2)}}, path)
    return path


def _no_vae(tmp, single, folder):
    dst = os.path.join(tmp, "sdxl")
    shutil.copytree(folder, dst, copy_function=os.symlink, ignore=shutil.ignore_patterns("vae"))
    return dst


def _empty_folder(tmp, single, folder):
    os.makedirs(os.path.join(tmp, "empty"))
    return os.path.join(tmp, "empty")


SD_UNET = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3)}
FOREIGN = {
    # name: (how to make it, what the sentence must say)
    "sd1": (_write({**SD_UNET, "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(8, 768)}),
            "is a Stable Diffusion 1.x checkpoint"),
    "sd2": (_write({**SD_UNET, "cond_stage_model.model.token_embedding.weight": torch.zeros(8, 1024)}),
            "is a Stable Diffusion 2.x checkpoint"),
    "sd3": (_write({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": torch.zeros(4, 4)}),
            "is a Stable Diffusion 3 checkpoint"),
    "lora": (_write({"lora_unet_down_blocks_1_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8)}),
             "is a LoRA"),
    "refiner": (_refiner, "is the SDXL refiner"),
    "inpainting": (_inpainting, "takes 9 input channels, not 4 (an inpainting"),
    "truncated": (_truncated, "truncated or corrupt"),
    "random_bytes": (_random_bytes, "truncated or corrupt"),
    "pickle_ckpt": (_ckpt, "is a PyTorch pickle checkpoint"),
    "folder_without_vae": (_no_vae, "vae/diffusion_pytorch_model.safetensors is missing"),
    "empty_folder": (_empty_folder, "is not an SDXL diffusers folder"),
    "missing_path": (lambda tmp, single, folder: os.path.join(tmp, "nope.safetensors"), "does not exist"),
}


@pytest.mark.parametrize("case", FOREIGN.values(), ids=FOREIGN.keys())
def test_a_checkpoint_that_is_not_sdxl_base_ends_in_one_sentence_saying_what_it_is(tiny, tmp_path, case):
    _, folder, single, _ = tiny
    make, says = case
    path = make(str(tmp_path), single, folder)
    with pytest.raises(CheckpointError) as err:
        SDXL.load(path)
    message = str(err.value)
    assert says in message and path in message
    assert "\n" not in message and message.count(". ") == 0  # one sentence


# ----------------------------------------------------------------------------------------------
# Finding the weights
# ----------------------------------------------------------------------------------------------

def fake_hub_cache(cache: str, revision: str, files: dict[str, str], main=True) -> str:
    """A huggingface_hub cache entry for SDXL base: the bytes in blobs/, the snapshot made of
    relative symlinks into blobs/, refs/main naming the revision. `files`: snapshot path -> source."""
    repo = os.path.join(cache, checkpoint.HUB_REPO_FOLDER)
    snapshot = os.path.join(repo, "snapshots", revision)
    for rel, source in files.items():
        blob = os.path.join(repo, "blobs", f"{revision}-{rel.replace('/', '-')}")
        os.makedirs(os.path.dirname(blob), exist_ok=True)
        if os.path.exists(source):
            os.link(source, blob)
        else:
            with open(blob, "wb") as f:
                f.write(b"placeholder")
        link = os.path.join(snapshot, rel)
        os.makedirs(os.path.dirname(link), exist_ok=True)
        os.symlink(os.path.relpath(blob, os.path.dirname(link)), link)
    if main:
        os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
        with open(os.path.join(repo, "refs", "main"), "w") as f:
            f.write(revision)
    return snapshot


DIFFUSERS_SNAPSHOT = [stem + ".fp16.safetensors" for stem in COMPONENT_FILES.values()]


@pytest.fixture
def clean_env(tmp_path, monkeypatch):
    """No weights in weights/, no Hugging Face variables, HOME in tmp_path."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(checkpoint, "WEIGHTS_DIR", str(tmp_path / "weights"))
    os.makedirs(tmp_path / "weights")
    return tmp_path


def test_weights_folder_comes_first_then_a_cached_single_file_that_loads_through_its_symlinks(tiny, clean_env):
    _, _, single, ref = tiny
    cache = clean_env / "home" / ".cache" / "huggingface" / "hub"
    snapshot = fake_hub_cache(str(cache), "a" * 40, {checkpoint.OFFICIAL_FILENAME: single})
    found = checkpoint.find_default_weights()
    assert found == os.path.join(snapshot, checkpoint.OFFICIAL_FILENAME) and os.path.islink(found)
    assert_same_weights(weights_of(SDXL.load(found)), weights_of(ref))
    local = clean_env / "weights" / checkpoint.OFFICIAL_FILENAME
    local.write_bytes(b"")
    assert checkpoint.find_default_weights() == str(local)


def test_a_cached_diffusers_snapshot_is_found_and_loads(tiny, clean_env):
    _, folder, _, ref = tiny
    fp16 = clean_env / "fp16"
    derived_folder(folder, str(fp16), {m: {os.path.basename(stem) + ".fp16.safetensors": half(component(folder, m))}
                                       for m, stem in COMPONENT_FILES.items()})
    cache = clean_env / "home" / ".cache" / "huggingface" / "hub"
    snapshot = fake_hub_cache(str(cache), "b" * 40, {rel: str(fp16 / rel) for rel in DIFFUSERS_SNAPSHOT})
    assert checkpoint.find_default_weights() == snapshot
    assert_same_weights(weights_of(SDXL.load(snapshot)), rounded_to_fp16(weights_of(ref)))


# Which cache huggingface_hub (and so we) read, for each set of environment variables.
CACHE_CASES = {
    "HF_HUB_CACHE_first": ({"HF_HUB_CACHE": "hub_cache", "HUGGINGFACE_HUB_CACHE": "legacy", "HF_HOME": "hf_home",
                            "XDG_CACHE_HOME": "xdg"}, "hub_cache"),
    "legacy_HUGGINGFACE_HUB_CACHE": ({"HUGGINGFACE_HUB_CACHE": "legacy", "HF_HOME": "hf_home"}, "legacy"),
    "HF_HOME_hub": ({"HF_HOME": "hf_home", "XDG_CACHE_HOME": "xdg"}, "hf_home/hub"),
    "XDG_CACHE_HOME": ({"XDG_CACHE_HOME": "xdg"}, "xdg/huggingface/hub"),
    "home_cache": ({}, "home/.cache/huggingface/hub"),
}
ALL_CACHES = ["hub_cache", "legacy", "hf_home/hub", "xdg/huggingface/hub", "home/.cache/huggingface/hub"]


@pytest.mark.parametrize("case", CACHE_CASES.values(), ids=CACHE_CASES.keys())
def test_hugging_face_cache_location_follows_huggingface_hub(clean_env, monkeypatch, case):
    env, expected = case
    for var, rel in env.items():
        monkeypatch.setenv(var, str(clean_env / rel))
    # A complete snapshot in every candidate cache, each with its own revision.
    snapshots = {rel: fake_hub_cache(str(clean_env / rel), f"{k:040d}", {rel_file: "" for rel_file in DIFFUSERS_SNAPSHOT})
                 for k, rel in enumerate(ALL_CACHES)}
    assert checkpoint.find_default_weights() == snapshots[expected]


def test_cache_prefers_the_snapshot_refs_main_names_and_skips_incomplete_ones(clean_env):
    cache = str(clean_env / "home" / ".cache" / "huggingface" / "hub")
    fake_hub_cache(cache, "0" * 40, {DIFFUSERS_SNAPSHOT[0]: ""}, main=False)  # a unet-only download
    fake_hub_cache(cache, "1" * 40, {rel: "" for rel in DIFFUSERS_SNAPSHOT}, main=False)
    latest = fake_hub_cache(cache, "2" * 40, {rel: "" for rel in DIFFUSERS_SNAPSHOT})
    assert checkpoint.find_default_weights() == latest
    os.remove(os.path.join(cache, checkpoint.HUB_REPO_FOLDER, "refs", "main"))
    assert checkpoint.find_default_weights().endswith("1" * 40)


def test_nothing_found_gives_none(clean_env):
    assert checkpoint.find_default_weights() is None


# ----------------------------------------------------------------------------------------------
# Conditioning
# ----------------------------------------------------------------------------------------------

def test_empty_negative_prompt_is_zero_context_and_pooled_and_a_real_one_is_encoded(tiny):
    model = tiny[3]
    context, pooled = model.encode_prompt(["a woman reading"])
    zero_c, zero_p = model.encode_negative("", 1, context, pooled)
    assert zero_c.shape == context.shape and zero_p.shape == pooled.shape
    assert not zero_c.any() and not zero_p.any()
    neg_c, neg_p = model.encode_negative("blurry", 2, context, pooled)
    want_c, want_p = model.encode_prompt(["blurry", "blurry"])
    assert torch.equal(neg_c, want_c) and torch.equal(neg_p, want_p)
    assert neg_p.abs().sum() > 0


def test_time_ids_are_exact_float32_in_a_bfloat16_model_and_t_stays_integer(tiny):
    _, _, single, _ = tiny
    model = SDXL.load(single, dtype=torch.bfloat16)
    seen = {}

    class Stop(Exception):
        pass

    def spy_unet(x_t, t, context, pooled, time_ids):
        seen.update(x_t=x_t, t=t, context=context, time_ids=time_ids)
        raise Stop

    model.unet = spy_unet
    # 2056 is not a bfloat16 number (8 significant bits round it to 2048).
    with pytest.raises(Stop):
        model.generate(["a woman"], [0], steps=3, width=1016, height=2056)
    assert seen["time_ids"].dtype == torch.float32
    assert seen["time_ids"].tolist() == [[2056.0, 1016.0, 0.0, 0.0, 2056.0, 1016.0]] * 2
    assert seen["t"].dtype == torch.int64 and seen["t"].tolist() == [667, 667]
    assert seen["x_t"].dtype == seen["context"].dtype == torch.bfloat16
    assert SDXL.time_ids(1016, 1024, 2, "cpu").tolist() == [[1016, 1024, 0, 0, 1016, 1024]] * 2


def _reference_encoding(text_model, e_hat, eos, projection=None):
    """transformers' CLIP text transformer run on given token embeddings (its `inputs_embeds`
    path), read as SDXL reads it: hidden_states[-2], and the final LayerNorm at `eos`."""
    L = e_hat.shape[1]
    causal = torch.full((L, L), float("-inf")).triu(1)[None, None]
    h = text_model.embeddings(inputs_embeds=e_hat)
    states = [h]
    for layer in text_model.encoder.layers:  # (what its encoder does, keeping every hidden state)
        states.append(layer(states[-1], causal))
    pooled = text_model.final_layer_norm(states[-1])[torch.arange(len(eos)), eos]
    return states[-2], None if projection is None else projection(pooled)


def _reference_insert(hf_tokenizer, embedding, prompts, subjects):
    """Eq. 4 done by hand, for one encoder: each pseudo-word w goes directly before its concept
    word's token, the padding's last row falls off, and the EOS moves one right per insertion."""
    rows, eos = [], []
    for prompt in prompts:
        ids = hf_tokenizer(prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids[0]
        e = list(embedding(ids))
        at = sorted(((ids.tolist().index(hf_tokenizer(c).input_ids[1]), w) for w, c in subjects), key=lambda p: -p[0])
        for i, w in at:  # rightmost first, so the earlier positions still hold
            e.insert(i, w)
        rows.append(torch.stack(e[:77]))
        eos.append(ids.tolist().index(49407) + len(subjects))
    return torch.stack(rows), torch.tensor(eos)


@pytest.mark.parametrize("prompts,concepts", [
    (["a woman reading a book", "a photo of a woman smiling"], ["woman"]),
    (["a man and a woman talking in a park", "a woman next to a man"], ["man", "woman"]),
], ids=["one_subject", "two_subjects"])
def test_encode_prompt_with_subjects_matches_transformers_on_the_inserted_embeddings(tiny, prompts, concepts):
    """Both encoders' context and bigG's pooled vector, with pseudo-words inserted, equal
    transformers' text models fed the inserted token embeddings, with pooled read at the
    shifted EOS (the pre-insertion EOS is off by far more than the tolerance)."""
    pipe, _, _, model = tiny
    g = torch.Generator().manual_seed(0)
    w_l = [torch.randn(pipe.text_encoder.config.hidden_size, generator=g) * 0.05 for _ in concepts]
    w_g = [torch.randn(pipe.text_encoder_2.config.hidden_size, generator=g) * 0.05 for _ in concepts]
    with torch.no_grad():
        context, pooled = model.encode_prompt(prompts, [(a, b, c) for a, b, c in zip(w_l, w_g, concepts)])
        e_l, eos_l = _reference_insert(pipe.tokenizer, pipe.text_encoder.embeddings.token_embedding,
                                       prompts, list(zip(w_l, concepts)))
        e_g, eos_g = _reference_insert(pipe.tokenizer_2, pipe.text_encoder_2.text_model.embeddings.token_embedding,
                                       prompts, list(zip(w_g, concepts)))
        want_l, _ = _reference_encoding(pipe.text_encoder, e_l, eos_l)
        want_g, want_pooled = _reference_encoding(pipe.text_encoder_2.text_model, e_g, eos_g,
                                                  pipe.text_encoder_2.text_projection)
        _, stale = _reference_encoding(pipe.text_encoder_2.text_model, e_g, eos_g - len(concepts),
                                       pipe.text_encoder_2.text_projection)
    torch.testing.assert_close(context, torch.cat([want_l, want_g], dim=-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(pooled, want_pooled, atol=1e-5, rtol=0)
    assert (stale - want_pooled).abs().max() > 1e-2


def test_decode_rounds_the_vae_output_to_the_nearest_uint8():
    """[-1, 1] -> [0, 255] rounds to nearest, as diffusers' image processor does (truncation is
    off by one on about half the pixels, which a 1/255 image tolerance would hide)."""
    pixels = torch.tensor([0.4, 0.6, 127.4, 127.6, 254.4, 254.6, -3.0, 300.0])  # on the 0-255 scale
    want = [0, 1, 127, 128, 254, 255, 0, 255]

    class VAE(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def decode(self, z):
            return (pixels / 255 - 0.5).mul(2).expand(z.shape[0], 3, 1, -1)  # x = 2·(p/255) − 1

    model = SDXL(None, None, None, None, None, VAE(), "cpu", torch.float32)
    images = model.decode(torch.zeros(1, 4, 1, 1))
    assert images.dtype == np.uint8 and images.shape == (1, 1, len(want), 3)
    assert images[0, 0, :, 0].tolist() == want


# ----------------------------------------------------------------------------------------------
# Generation: one batched path, each image as it would be alone
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def one_image_as_before(model: SDXL, prompt, seed, negative_prompt="", steps=30, guidance=5.0, eta=0.0,
                        width=1024, height=1024, subjects=None):
    """A frozen copy of the one-image SDXL.generate that sample.py called before generation was
    batched (its math line for line, without the offload and CUDA-graph hooks): the images
    sample.py wrote then, which it must still write bit for bit."""
    from model import ddim

    context, pooled = model.encode_prompt([prompt], subjects)
    neg_context, neg_pooled = model.encode_negative(negative_prompt if guidance != 1 else "", 1, context, pooled)
    time_ids = model.time_ids(height, width, 2, model.device)
    n = 1 if guidance == 1 else 2
    cond = (torch.cat([context, neg_context])[:n].to(model.dtype), torch.cat([pooled, neg_pooled])[:n].to(model.dtype),
            time_ids[:n].contiguous())

    def eps_fn(x_t, t):
        eps = model.unet(x_t.repeat(n, 1, 1, 1).to(model.dtype), t.repeat(n), *cond).float()
        return eps.chunk(2) if n == 2 else (eps, None)

    generator = torch.Generator("cpu").manual_seed(seed)
    x_T = ddim.randn((1, 4, height // 8, width // 8), generator, model.device, torch.float32)
    x_0 = ddim.sample(eps_fn, x_T, steps, guidance, eta, generator)
    return model.decode(x_0)[0]


def pseudo_words(n, seed=0):
    """n random pseudo-words per tiny encoder (CLIP-L 64 wide, bigG 128), about a token's size."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 64, generator=g) * 0.05, torch.randn(n, 128, generator=g) * 0.05


GENERATE_CASES = {  # name -> (prompt, seed, keyword arguments)
    "plain": ("a woman reading a book", 0, dict(steps=3)),
    "negative_prompt_eta_1": ("a portrait photo of a man", 7, dict(negative_prompt="blurry", steps=3, guidance=7.5, eta=1.0)),
    "guidance_1": ("a red bicycle by a wall", 5, dict(steps=2, guidance=1.0)),
    "pseudo_word_eta_half": ("a woman surfing a wave", 3, dict(steps=3, eta=0.5, subjects="woman")),
}


@pytest.mark.parametrize("case", GENERATE_CASES.values(), ids=GENERATE_CASES.keys())
def test_one_image_is_bit_for_bit_the_image_the_one_image_pipeline_made(tiny, case):
    model = tiny[3]
    prompt, seed, kwargs = case
    if "subjects" in kwargs:
        w_l, w_g = pseudo_words(1)
        kwargs = {**kwargs, "subjects": [(w_l[0], w_g[0], kwargs["subjects"])]}
    image = model.generate([prompt], [seed], width=64, height=64, batch_size=1, **kwargs)
    before = one_image_as_before(model, prompt, seed, width=64, height=64, **kwargs)
    assert image.shape == (1, 64, 64, 3) and before.std() > 10  # a real image, not a flat one
    np.testing.assert_array_equal(image[0], before)


def test_a_batch_gives_every_image_the_one_it_gets_alone_eta_noise_included(tiny):
    """Three images, each with its own pseudo-word and concept, at η = 0.5: in one UNet batch they
    equal the images made one at a time (float32 rounding of batched kernels at most: 1/255); in
    batches of two, the third is alone in its batch and equal bit for bit; a batch_size larger
    than N is one batch."""
    model = tiny[3]
    prompts, seeds, concepts = ["a woman reading", "a man surfing at dawn", "a woman in a red coat"], [3, 11, 3], ["woman", "man", "woman"]
    w_l, w_g = pseudo_words(3)
    kwargs = dict(steps=2, guidance=5.0, eta=0.5, width=64, height=64)
    alone = [model.generate([prompts[i]], [seeds[i]], [(w_l[i], w_g[i], concepts[i])], **kwargs)[0] for i in range(3)]
    batch = model.generate(prompts, seeds, [(w_l, w_g, concepts)], **kwargs)
    in_twos = model.generate(prompts, seeds, [(w_l, w_g, concepts)], batch_size=2, **kwargs)
    room_to_spare = model.generate(prompts, seeds, [(w_l, w_g, concepts)], batch_size=4, **kwargs)
    assert batch.shape == in_twos.shape == (3, 64, 64, 3)
    np.testing.assert_array_equal(room_to_spare, batch)
    for i in range(3):
        assert np.abs(batch[i].astype(int) - alone[i]).max() <= 1, i
        assert np.abs(in_twos[i].astype(int) - alone[i]).max() <= 1, i
    np.testing.assert_array_equal(in_twos[2], alone[2])
    assert np.abs(alone[0].astype(int) - alone[2]).mean() > 1  # two seeds 3, two words: two images


def test_a_shared_pseudo_word_and_concept_serve_every_image_of_the_batch(tiny):
    model = tiny[3]
    w_l, w_g = pseudo_words(1, seed=1)
    kwargs = dict(steps=2, width=64, height=64)
    prompts, seeds = ["a woman reading", "a woman surfing"], [1, 2]
    shared = model.generate(prompts, seeds, [(w_l[0], w_g[0], "woman")], batch_size=1, **kwargs)
    per_image = model.generate(prompts, seeds, [(w_l.expand(2, -1), w_g.expand(2, -1), ["woman", "woman"])],
                               batch_size=1, **kwargs)
    np.testing.assert_array_equal(shared, per_image)
