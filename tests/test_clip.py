"""SDXL's text encoders (model/clip.py) against transformers, at scaled-down sizes.

transformers' CLIPTextModel (quick_gelu) plays CLIP-L and CLIPTextModelWithProjection (gelu)
plays bigG, with the same random weights. Each is saved in both layouts our loader reads:
diffusers' (`text_encoder/`, `text_encoder_2/`) and the official single file's (prefixed
OpenCLIP/transformers names, written here by the test's own table and checked against
tests/data/sdxl_keys.json), then loaded through model/checkpoint.py (stream_tensors, from_diffusers, build).
"""

import json
import os
import re

import pytest
import torch
from safetensors.torch import save_file

from model import checkpoint
from model.checkpoint import CheckpointError, read_shapes, stream_tensors
from model.clip import CLIPTextConfig, CLIPTextModel, OpenCLIPTextConfig, OpenCLIPTextModel, Tokenizer, eos_positions

KEYS = json.load(open(os.path.join(os.path.dirname(__file__), "data", "sdxl_keys.json")))
PREFIX_L = "conditioner.embedders.0.transformer."
PREFIX_G = "conditioner.embedders.1.model."
LAYERS, WIDTH, MLP, PROJ = 3, 128, 512, 96  # two 64-wide heads; P non-square so a missing transpose fails


def build_clip_l(sd):
    return checkpoint.build("clip_l", sd)


def build_clip_g(sd):
    return checkpoint.build("clip_g", sd)


def clip_l_from_diffusers(sd):
    return checkpoint.from_diffusers("clip_l", sd)


def clip_g_from_diffusers(sd):
    return checkpoint.from_diffusers("clip_g", sd)


def encode(model, ids):
    """Token ids straight through an encoder: embed, then the transformer with the EOS where the ids have it."""
    return model(model.embed(ids), eos_positions(ids))


PROMPTS = ["a woman reading", "", "a photo of a cat!!! it's 1999", "a long prompt, " * 40]


def _hf_config(act):
    from transformers import CLIPTextConfig as HFConfig

    # eos_token_id=2 is what SDXL's diffusers configs say: transformers then reads the pooled
    # feature at ids.argmax(-1), the first EOS, as sgm does. Eager attention keeps the
    # reference independent of our SDPA path.
    return HFConfig(
        vocab_size=49408,
        hidden_size=WIDTH,
        intermediate_size=MLP,
        num_hidden_layers=LAYERS,
        num_attention_heads=WIDTH // 64,
        max_position_embeddings=77,
        hidden_act=act,
        projection_dim=PROJ,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
        attn_implementation="eager",
    )


def _randomize(model):
    # Default inits leave LayerNorms at (1, 0) and biases at 0, which would hide swapped or
    # dropped LayerNorm/bias tensors; give every tensor its own random values.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.05 * torch.randn_like(p) if p.ndim > 1 else 0.1 * torch.randn_like(p))
    return model.eval()


def _official_clip_l(diffusers_sd):
    """The official file stores CLIP-L under transformers' names, plus the optional position_ids."""
    return {"text_model.embeddings.position_ids": torch.arange(77)[None], **diffusers_sd}


def _official_clip_g(diffusers_sd):
    """OpenCLIP's names for a transformers CLIPTextModelWithProjection (the test's own table)."""
    d = diffusers_sd
    out = {
        "token_embedding.weight": d["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": d["text_model.embeddings.position_embedding.weight"],
        "ln_final.weight": d["text_model.final_layer_norm.weight"],
        "ln_final.bias": d["text_model.final_layer_norm.bias"],
        "text_projection": d["text_projection.weight"].T.contiguous(),
        "logit_scale": torch.tensor(4.6052),
    }
    for n in range(LAYERS):
        hf, oc = f"text_model.encoder.layers.{n}.", f"transformer.resblocks.{n}."
        for kind in ("weight", "bias"):
            out[f"{oc}attn.in_proj_{kind}"] = torch.cat([d[f"{hf}self_attn.{x}_proj.{kind}"] for x in "qkv"])
            out[f"{oc}attn.out_proj.{kind}"] = d[f"{hf}self_attn.out_proj.{kind}"]
            out[f"{oc}ln_1.{kind}"] = d[f"{hf}layer_norm1.{kind}"]
            out[f"{oc}ln_2.{kind}"] = d[f"{hf}layer_norm2.{kind}"]
            out[f"{oc}mlp.c_fc.{kind}"] = d[f"{hf}mlp.fc1.{kind}"]
            out[f"{oc}mlp.c_proj.{kind}"] = d[f"{hf}mlp.fc2.{kind}"]
    return out


def _assert_same_layout_as_sdxl(names, official):
    """The tiny file's names are the official ones truncated to LAYERS blocks."""
    kept = {k for k in official if not (m := re.search(r"\.(layers|resblocks)\.(\d+)\.", k)) or int(m[2]) < LAYERS}
    assert set(names) == kept


@pytest.fixture(scope="module")
def hf_models():
    from transformers import CLIPTextModel as HFTextModel
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(0)
    return _randomize(HFTextModel(_hf_config("quick_gelu"))), _randomize(CLIPTextModelWithProjection(_hf_config("gelu")))


@pytest.fixture(scope="module")
def checkpoint_files(hf_models, tmp_path_factory):
    """One tiny SDXL-layout single file and one tiny diffusers folder holding the same weights."""
    root = tmp_path_factory.mktemp("sdxl_tiny")
    hf_l, hf_g = hf_models
    # transformers 5 saves CLIPTextModel without the `text_model.` prefix diffusers' files carry.
    diffusers_l = {f"text_model.{k}": v.contiguous() for k, v in hf_l.state_dict().items()}
    diffusers_g = {k: v.contiguous() for k, v in hf_g.state_dict().items()}
    single = {PREFIX_L + k: v for k, v in _official_clip_l(diffusers_l).items()}
    single |= {PREFIX_G + k: v for k, v in _official_clip_g(diffusers_g).items()}
    files = {
        "single": str(root / "sd_xl_tiny.safetensors"),
        "text_encoder": str(root / "text_encoder" / "model.safetensors"),
        "text_encoder_2": str(root / "text_encoder_2" / "model.safetensors"),
    }
    for name, sd in (("single", single), ("text_encoder", diffusers_l), ("text_encoder_2", diffusers_g)):
        os.makedirs(os.path.dirname(files[name]), exist_ok=True)
        save_file(sd, files[name])
    return files


def _load_single(path, prefix):
    names = [k for k in read_shapes(path) if k.startswith(prefix)]
    return dict(stream_tensors(path, names, strip_prefix=prefix))


def _load(path):
    return dict(stream_tensors(path, list(read_shapes(path))))


@pytest.fixture(scope="module")
def encoders(checkpoint_files):
    """{layout: (CLIP-L, bigG)} loaded through our code paths."""
    single = checkpoint_files["single"]
    return {
        "official": (build_clip_l(_load_single(single, PREFIX_L)), build_clip_g(_load_single(single, PREFIX_G))),
        "diffusers": (
            build_clip_l(clip_l_from_diffusers(_load(checkpoint_files["text_encoder"]))),
            build_clip_g(clip_g_from_diffusers(_load(checkpoint_files["text_encoder_2"]))),
        ),
    }


def test_tiny_files_use_the_official_and_diffusers_names(checkpoint_files):
    shapes = read_shapes(checkpoint_files["single"])
    for group, prefix in (("clip_l", PREFIX_L), ("clip_g", PREFIX_G)):
        _assert_same_layout_as_sdxl([k for k in shapes if k.startswith(prefix)], KEYS["single_file"][group])
    for folder in ("text_encoder", "text_encoder_2"):
        _assert_same_layout_as_sdxl(read_shapes(checkpoint_files[folder]), KEYS["diffusers"][f"{folder}/model.safetensors"])


def test_architecture_is_read_from_the_checkpoint(encoders):
    for clip_l, clip_g in encoders.values():
        assert clip_l.config == CLIPTextConfig(width=WIDTH, layers=LAYERS, heads=2, mlp_width=MLP)
        assert clip_g.config == OpenCLIPTextConfig(width=WIDTH, layers=LAYERS, heads=2, mlp_width=MLP, projection_dim=PROJ)


@pytest.mark.parametrize("layout", ["official", "diffusers"])
def test_clip_l_penultimate_state_matches_transformers(encoders, hf_models, layout):
    ids = Tokenizer.bundled("eos")(PROMPTS)
    with torch.no_grad():
        want = hf_models[0](input_ids=ids, output_hidden_states=True).hidden_states[-2]
        got = encode(encoders[layout][0], ids)
    assert got.pooled is None
    torch.testing.assert_close(got.penultimate, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("layout", ["official", "diffusers"])
def test_clip_g_penultimate_state_and_pooled_output_match_transformers(encoders, hf_models, layout):
    ids = Tokenizer.bundled("!")(PROMPTS)
    with torch.no_grad():
        want = hf_models[1](input_ids=ids, output_hidden_states=True)
        got = encode(encoders[layout][1], ids)
    torch.testing.assert_close(got.penultimate, want.hidden_states[-2], atol=1e-5, rtol=0)
    torch.testing.assert_close(got.pooled, want.text_embeds, atol=1e-5, rtol=0)
    assert got.pooled.shape == (len(PROMPTS), PROJ)


def test_pooled_output_reads_the_given_eos_after_insertion(encoders, hf_models):
    # CoCoIns' insertion (eq. 4) in miniature: put an extra token embedding at position i,
    # shift the rest right, and read the pooled feature at the shifted EOS. With a vocabulary
    # embedding as the pseudo-word, that is the same as inserting its id, which transformers
    # can check.
    clip_g = encoders["official"][1]
    ids = Tokenizer.bundled("!")(["a photo of a woman reading"])
    i, w_id = 4, 1234
    eos = eos_positions(ids)
    e = clip_g.embed(ids)
    w = clip_g.embed(torch.tensor([[w_id]]))  # (1, 1, D)
    e_hat = torch.cat([e[:, :i], w, e[:, i:-1]], dim=1)
    ids_hat = torch.cat([ids[:, :i], torch.tensor([[w_id]]), ids[:, i:-1]], dim=1)
    assert eos_positions(ids_hat) == eos + 1
    with torch.no_grad():
        got = clip_g(e_hat, eos + 1)
        stale = clip_g(e_hat, eos)
        want = hf_models[1](input_ids=ids_hat).text_embeds
        before = encode(clip_g, ids)
    torch.testing.assert_close(got.pooled, want, atol=1e-5, rtol=0)
    assert not torch.allclose(stale.pooled, want, atol=1e-3)
    # Causal attention: tokens before the insertion point do not see it.
    torch.testing.assert_close(got.penultimate[:, :i], before.penultimate[:, :i], atol=1e-6, rtol=0)


def test_encoders_run_in_bfloat16_close_to_float32(checkpoint_files):
    sd = _load_single(checkpoint_files["single"], PREFIX_G)
    clip_g32 = build_clip_g(sd)
    clip_g16 = build_clip_g({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in sd.items()})
    ids = Tokenizer.bundled("!")(PROMPTS[:2])
    e = clip_g32.embed(ids)  # float32 embeddings (as a float32 mapper would produce) into a bf16 model
    with torch.no_grad():
        got, want = clip_g16(e, eos_positions(ids)), clip_g32(e, eos_positions(ids))
    assert got.penultimate.dtype == got.pooled.dtype == torch.bfloat16
    torch.testing.assert_close(got.pooled.float(), want.pooled, atol=0.05, rtol=0.05)


# --- full size, on the meta device ---


def _official(group, prefix, ignored):
    return {k[len(prefix) :]: tuple(s) for k, s in KEYS["single_file"][group].items() if k[len(prefix) :] not in ignored}


def _shapes(sd):
    return {k: tuple(v.shape) for k, v in sd.items()}


def test_full_size_clip_l_has_the_official_names_and_shapes():
    want = _official("clip_l", PREFIX_L, {"text_model.embeddings.position_ids"})
    with torch.device("meta"):
        model = CLIPTextModel(CLIPTextConfig())
    assert _shapes(model.state_dict()) == want
    assert sum(p.numel() for p in model.parameters()) == KEYS["single_file_param_counts"]["clip_l"] == 123_060_480
    assert checkpoint.config_from_shapes("clip_l", _official("clip_l", PREFIX_L, ())) == CLIPTextConfig()


def test_full_size_clip_g_has_the_official_names_and_shapes():
    want = _official("clip_g", PREFIX_G, {"logit_scale"})
    with torch.device("meta"):
        model = OpenCLIPTextModel(OpenCLIPTextConfig())
    assert _shapes(model.state_dict()) == want
    # The official count includes logit_scale, one scalar.
    assert sum(p.numel() for p in model.parameters()) + 1 == KEYS["single_file_param_counts"]["clip_g"]
    assert checkpoint.config_from_shapes("clip_g", _official("clip_g", PREFIX_G, ())) == OpenCLIPTextConfig()


def _meta_tensors(shapes):
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


def test_full_size_diffusers_text_encoders_convert_to_the_official_layout():
    for file, convert, build, group, prefix, ignored in (
        ("text_encoder", clip_l_from_diffusers, build_clip_l, "clip_l", PREFIX_L, {"text_model.embeddings.position_ids"}),
        ("text_encoder_2", clip_g_from_diffusers, build_clip_g, "clip_g", PREFIX_G, {"logit_scale"}),
    ):
        converted = convert(_meta_tensors(KEYS["diffusers"][f"{file}/model.safetensors"]))
        kept = {k: v for k, v in converted.items() if k not in checkpoint.IGNORED[group]}
        assert _shapes(kept) == _official(group, prefix, ignored), file
        model = build(converted)
        assert model.config == (CLIPTextConfig() if group == "clip_l" else OpenCLIPTextConfig())
        assert all(p.is_meta for p in model.parameters())


# --- wrong checkpoints ---


@pytest.fixture
def official_g(checkpoint_files):
    return _load_single(checkpoint_files["single"], PREFIX_G)


def test_missing_tensor_is_named(official_g):
    del official_g["transformer.resblocks.1.mlp.c_fc.bias"]
    with pytest.raises(CheckpointError, match=r"1 missing \(transformer\.resblocks\.1\.mlp\.c_fc\.bias\)"):
        build_clip_g(official_g)


def test_unexpected_tensor_is_named(checkpoint_files):
    sd = _load_single(checkpoint_files["single"], PREFIX_L)
    sd["text_model.encoder.layers.0.self_attn.extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"1 unexpected \(text_model\.encoder\.layers\.0\.self_attn\.extra\.weight\)"):
        build_clip_l(sd)


def test_incomplete_diffusers_qkv_names_the_fused_and_leftover_tensors(checkpoint_files):
    sd = _load(checkpoint_files["text_encoder_2"])
    del sd["text_model.encoder.layers.2.self_attn.k_proj.weight"]
    with pytest.raises(CheckpointError, match=r"missing \(transformer\.resblocks\.2\.attn\.in_proj_weight\).*unexpected \(.*q_proj\.weight"):
        build_clip_g(clip_g_from_diffusers(sd))


def test_wrong_shape_is_named(official_g):
    official_g["ln_final.bias"] = torch.zeros(WIDTH + 1)
    with pytest.raises(CheckpointError, match=r"ln_final\.bias is \(129,\)"):
        build_clip_g(official_g)


def test_a_file_that_is_not_a_text_encoder_is_rejected(official_g):
    with pytest.raises(CheckpointError, match="text_model.embeddings.token_embedding.weight"):
        build_clip_l(official_g)  # bigG's tensors offered as CLIP-L
