"""CLIP ViT-L/14 whole (model/clip_vision.py) against transformers' CLIPModel.

A scaled-down CLIP with the real topology (quick_gelu, 64-wide heads, class token, pre- and
post-LayerNorm, bias-free projections, the real 49,408-token vocabulary) is built with
transformers, randomised everywhere, saved as transformers saves `openai/clip-vit-large-patch14`,
and loaded through `clip_from_transformers` + `build_clip_model`, the path eval.py takes.
"""

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from model import checkpoint, clip, clip_vision
from model.checkpoint import CheckpointError
from tests.tiny_sdxl import _randomize

PROMPTS = ["a woman is looking at the camera.", "a photo of a red bicycle leaning on a wall at dusk"]


def tiny_transformers_clip(seed=0, image_size=56):
    """transformers' CLIPModel at a tiny ViT-L/14 topology (16 patches of 14 px + class token)."""
    from transformers import CLIPConfig, CLIPModel

    text = dict(vocab_size=49408, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                num_attention_heads=1, max_position_embeddings=77, hidden_act="quick_gelu",
                bos_token_id=49406, eos_token_id=2, pad_token_id=1)
    vision = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=2,
                  image_size=image_size, patch_size=14, hidden_act="quick_gelu")
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=32)
    config._attn_implementation = "eager"
    model = CLIPModel(config)
    g = torch.Generator().manual_seed(seed)
    for part in (model.text_model, model.vision_model, model.visual_projection, model.text_projection):
        _randomize(part, g)  # logit_scale (0-d) keeps CLIP's initial temperature
    with torch.no_grad():  # a class token as large as the patch embeddings, so a mix-up shows
        model.vision_model.embeddings.class_embedding.copy_(torch.randn(128, generator=g))
    return model.eval()


def save_as_hub_folder(model, folder):
    """The folder as transformers writes it (model.safetensors + config.json), the hub's layout."""
    model.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    reference = tiny_transformers_clip()
    folder = save_as_hub_folder(reference, str(tmp_path_factory.mktemp("clip")))
    ours = checkpoint.build_clip_model(checkpoint.clip_from_transformers(load_file(f"{folder}/model.safetensors")))
    return reference, ours, folder


def images(n, size, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


def test_image_embeddings_match_transformers(pair):
    reference, ours, _ = pair
    pixels = torch.stack([clip_vision.clip_preprocess(im, 56) for im in images(3, (70, 90))])
    with torch.no_grad():
        expected = reference.get_image_features(pixel_values=pixels).pooler_output
        got = ours.encode_image(pixels)
    assert got.shape == (3, 32)
    assert rel_err(got, expected) <= 1e-5


def test_text_embeddings_match_transformers_reading_the_last_layer_at_eos(pair):
    reference, ours, _ = pair
    ids = clip.Tokenizer.bundled(pad="eos")(PROMPTS)
    with torch.no_grad():
        expected = reference.get_text_features(input_ids=ids).pooler_output
        got = ours.encode_text(ids)
    assert rel_err(got, expected) <= 1e-5
    # The penultimate-state path SDXL uses would give something else entirely: the test can tell.
    assert rel_err(got[:, :8], ours.text_model.embeddings.token_embedding(ids)[:, 0, :8]) > 0.5


def test_clip_t_is_the_raw_cosine_transformers_computes(pair):
    reference, ours, _ = pair
    ids = clip.Tokenizer.bundled(pad="eos")(PROMPTS)
    pixels = torch.stack([clip_vision.clip_preprocess(im, 56) for im in images(2, (56, 56), seed=1)])
    with torch.no_grad():
        out = reference(input_ids=ids, pixel_values=pixels)
        # transformers' logits are exp(logit_scale)·cos; divide the temperature back out.
        expected = out.logits_per_image.diagonal() / reference.logit_scale.exp()
        got = torch.nn.functional.cosine_similarity(ours.encode_image(pixels), ours.encode_text(ids))
    assert (got - expected).abs().max() <= 1e-5


def test_the_image_tower_is_bidirectional(pair):
    """Changing the last patch must move the class token's embedding (a causal mask would hide it)."""
    _, ours, _ = pair
    x = torch.randn(1, 3, 56, 56)
    y = x.clone()
    y[..., 42:, 42:] += 1  # the last 14×14 patch only
    with torch.no_grad():
        assert (ours.encode_image(x) - ours.encode_image(y)).abs().max() > 1e-3


def test_preprocessing_equals_transformers_clip_image_processor():
    """Shortest side to 224 (bicubic), centre crop with the odd pixel at the bottom/right, CLIP's mean/std."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    processor = CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    for size in ((300, 225), (225, 401), (224, 224), (1024, 1024), (97, 131)):
        im = images(1, size, seed=sum(size))[0]
        expected = torch.as_tensor(np.asarray(processor(images=im, return_tensors="np")["pixel_values"][0]))
        got = clip_vision.clip_preprocess(im)
        assert got.shape == (3, 224, 224)
        assert (got - expected).abs().max() < 1e-5, size


def test_a_file_that_is_not_clip_is_one_sentence(pair):
    _, _, folder = pair
    sd = load_file(f"{folder}/model.safetensors")
    text_only = {k: v for k, v in sd.items() if k.startswith("text_model.")}
    with pytest.raises(CheckpointError, match=r"is not a CLIP model.*no tensor vision_model\.embeddings\.class_embedding"):
        checkpoint.clip_from_transformers(text_only, "x.safetensors")


def test_full_size_configuration_is_vit_l_14():
    """The defaults are ViT-L/14's: read back from meta-device shapes as the loader reads a file."""
    with torch.device("meta"):
        model = clip_vision.CLIPModel(clip.CLIPTextConfig(), clip_vision.CLIPVisionConfig(), 768)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    text, vision, projection = checkpoint.clip_config_from_state_dict(shapes)
    assert (vision.image_size, vision.patch_size, vision.width, vision.layers, vision.heads) == (224, 14, 1024, 24, 16)
    assert (text.width, text.layers, projection) == (768, 12, 768)
    assert shapes["vision_model.embeddings.position_embedding.weight"] == (257, 1024)
    assert sum(np.prod(s) for s in shapes.values()) == 427_616_512  # CLIPModel ViT-L/14 less logit_scale
