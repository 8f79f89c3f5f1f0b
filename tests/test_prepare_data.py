"""prepare_data.py end to end on toy-sized transformers models, then data.py and train.py on what it wrote.

The three models are built here from transformers configs and saved as local folders, as a
user's downloaded models would be: LLaVA-Next (captioner), Grounding DINO (detector) and SAM
(segmenter). The detector and segmenter keep their random weights: `--box-threshold 0` makes
every image a hit, 1 makes none. The captioner's language model is wired by hand to answer each
prompt with a known caption: its layers add nothing (zero output projections), so the last
position holds the embedding of the prompt's last word, and the output head maps that word to
its caption (one token) and the caption to the end of text. So the test knows which caption
each question gets, and can give one that breaks the concept-word rule.
"""

import json
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import data
import prepare_data
from model.errors import UserError
from tests.test_data import save_image, truncate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The captioner's answer to each question, keyed by the question's last word (see PROMPTS).
ANSWERS = {
    "image.": "a dog dog next to a girl",  # "describe": dog twice, so --concept dog re-asks it; girl once
    "photo.": "a girl and her dog on the grass",  # "caption"
    "once.": "a sleepy dog in the snow",  # "retry"
    "person.": "a girl playing with her dog",  # "auto": a girl
}
DOG_CAPTIONS = ["a girl and her dog on the grass", "a sleepy dog in the snow"]
IMAGES = {"rex.jpg": (96, 64), "park/bella.png": (64, 80), "park/deep/max.webp": (72, 72)}


pytestmark = pytest.mark.usefixtures("one_thread")


def last_word(prompt):
    return prompt.format(concept="x").split()[-1]


def save_captioner(folder):
    """A toy LLaVA-Next whose greedy answer to a prompt is ANSWERS[its last word]."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration,
                              LlavaNextImageProcessor, LlavaNextProcessor, PreTrainedTokenizerFast)

    assert sorted(ANSWERS) == sorted(last_word(p) for p in prepare_data.PROMPTS.values())
    special = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
    vocab = {t: i for i, t in enumerate(special + list(ANSWERS) + list(ANSWERS.values()))}
    words = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()  # "image." stays one word
    words.decoder = decoders.WordPiece()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>", extra_special_tokens={"image_token": "<image>"})
    # The user's text comes last, so the prompt's last word is the question's.
    template = ("{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image> "
                "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}")
    grid = [[32, 32], [32, 64], [64, 32]]
    processor = LlavaNextProcessor(
        image_processor=LlavaNextImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                                image_grid_pinpoints=grid),
        tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="default", chat_template=template,
        image_token="<image>", num_additional_image_tokens=1)  # CLIP's class token, dropped by "default"
    V, H = len(vocab), 32
    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                       image_size=32, patch_size=8),
        text_config=LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=32, num_hidden_layers=1,
                                num_attention_heads=2, num_key_value_heads=2, pad_token_id=0, bos_token_id=1,
                                eos_token_id=2, tie_word_embeddings=False),
        image_token_index=vocab["<image>"], image_grid_pinpoints=grid, vision_feature_layer=-1,
        vision_feature_select_strategy="default")
    model = LlavaNextForConditionalGeneration(config).eval()
    lm = model.model.language_model
    with torch.no_grad():
        lm.embed_tokens.weight.copy_(torch.eye(V, H))  # token v -> unit vector v
        for layer in lm.layers:  # every layer adds zero: the residual stream keeps the embedding
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        head = torch.zeros(V, H)
        head[vocab["</s>"], :V] = 1  # by default the next token is the end of text
        for word, answer in ANSWERS.items():
            head[:, vocab[word]] = 0
            head[vocab[answer], vocab[word]] = 1  # the question's last word -> its answer
        model.lm_head.weight.copy_(head)
    model.generation_config.eos_token_id = vocab["</s>"]
    model.generation_config.pad_token_id = vocab["<pad>"]
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


def save_detector(folder):
    """A toy Grounding DINO with random weights and a BERT word-piece vocabulary of the concepts."""
    from transformers import (BertConfig, BertTokenizerFast, GroundingDinoConfig, GroundingDinoForObjectDetection,
                              GroundingDinoImageProcessor, GroundingDinoProcessor, SwinConfig)

    os.makedirs(folder)
    with open(os.path.join(folder, "vocab.txt"), "w") as f:
        f.write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "dog", "girl", "teddy", "bear"]) + "\n")
    tokenizer = BertTokenizerFast(os.path.join(folder, "vocab.txt"))
    config = GroundingDinoConfig(
        backbone_config=SwinConfig(image_size=64, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                                   window_size=2, out_features=["stage2", "stage3", "stage4"]),
        text_config=BertConfig(vocab_size=10, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32, max_position_embeddings=32),
        num_feature_levels=3, num_queries=8, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
        encoder_attention_heads=2, decoder_attention_heads=2, d_model=32, encoder_n_points=2, decoder_n_points=2,
        max_text_len=32)
    GroundingDinoForObjectDetection(config).save_pretrained(folder)
    GroundingDinoProcessor(image_processor=GroundingDinoImageProcessor(size={"shortest_edge": 64, "longest_edge": 96}),
                           tokenizer=tokenizer).save_pretrained(folder)


def save_segmenter(folder):
    """A toy SAM (64-pixel inputs, 8-pixel patches) with random weights."""
    from transformers import (SamConfig, SamImageProcessor, SamMaskDecoderConfig, SamModel, SamProcessor,
                              SamPromptEncoderConfig, SamVisionConfig)

    config = SamConfig(
        vision_config=SamVisionConfig(hidden_size=16, output_channels=16, num_hidden_layers=2, num_attention_heads=2,
                                      image_size=64, patch_size=8, window_size=4, global_attn_indexes=(1,),
                                      num_pos_feats=8, mlp_dim=32),
        prompt_encoder_config=SamPromptEncoderConfig(hidden_size=16, image_size=64, patch_size=8, mask_input_channels=4),
        mask_decoder_config=SamMaskDecoderConfig(hidden_size=16, mlp_dim=32, num_hidden_layers=2, num_attention_heads=2,
                                                 iou_head_hidden_dim=16))
    SamModel(config).save_pretrained(folder)
    SamProcessor(image_processor=SamImageProcessor(
        size={"longest_edge": 64}, pad_size={"height": 64, "width": 64},
        mask_size={"longest_edge": 16}, mask_pad_size={"height": 16, "width": 16})).save_pretrained(folder)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    for name, save in (("captioner", save_captioner), ("detector", save_detector), ("segmenter", save_segmenter)):
        save(str(root / name))
    return root


def make_folder(root, images=IMAGES):
    for k, (name, (w, h)) in enumerate(images.items()):
        save_image(str(root / name), w=w, h=h, seed=k)
    (root / "notes.txt").write_text("not an image")
    return root


def argv(folder, models, *extra, concept="dog", threshold=0):
    return [str(a) for a in ("--data", folder, "--concept", concept, "--captioner", models / "captioner",
                             "--detector", models / "detector", "--segmenter", models / "segmenter",
                             "--box-threshold", threshold, "--batch-size", 2, "--device", "cpu", *extra)]


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def snapshot(folder):
    """Every file the command wrote, with its bytes and modification time."""
    found = {}
    for parent, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(parent, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, folder)] = (f.read(), os.stat(path).st_mtime_ns)
    return found


@pytest.fixture(scope="module")
def prepared(models, tmp_path_factory):
    """One uninterrupted run on a dog folder; returns the folder and the summary line."""
    folder = make_folder(tmp_path_factory.mktemp("dogs"))
    import io
    from contextlib import redirect_stdout

    out = io.StringIO()
    with redirect_stdout(out):
        prepare_data.main(argv(folder, models))
    return folder, out.getvalue()


def test_prepare_data_writes_two_captions_naming_the_concept_and_a_mask_per_image(prepared):
    folder, summary = prepared
    lines = read_jsonl(folder / "captions.jsonl")
    assert [line["image"] for line in lines] == ["park/bella.png", "park/deep/max.webp", "rex.jpg"]
    for line in lines:
        # the "describe" answer named the dog twice: it was re-asked and replaced by the "retry" answer
        assert line == {"image": line["image"], "captions": DOG_CAPTIONS, "concept": "dog"}
        mask = Image.open(folder / "masks" / (os.path.splitext(line["image"])[0] + ".png"))
        assert mask.mode == "L" and mask.size == IMAGES[line["image"]]
        values = set(np.unique(np.asarray(mask)).tolist())
        assert values <= {0, 255} and 255 in values
    assert summary.strip().endswith("3 of 3 images have captions and masks in "
                                    f"{folder}/captions.jsonl and {folder}/masks (3 made now); nothing skipped")
    left = [p for p in snapshot(folder) if p.endswith(".tmp") or p.startswith(".prepare_data/captions")]
    assert left == []


# Grounded SAM with known answers: the detector's boxes and scores are given, and the segmenter
# answers a box with exactly that box's pixels, so the test knows which mask each image must get.
BOX_A, BOX_B = (8, 16, 24, 48), (40, 8, 56, 40)  # (x0, y0, x1, y1) in a 64 x 64 image


class KnownBoxes:
    """A Grounding DINO stand-in whose queries find `boxes` (pixel corners in a 64 x 64 image) with `scores`."""

    def __init__(self, boxes, scores):
        self.boxes = torch.tensor([[(x0 + x1) / 128, (y0 + y1) / 128, (x1 - x0) / 64, (y1 - y0) / 64]
                                   for x0, y0, x1, y1 in boxes])  # centre and size, fractions of the image
        self.logits = torch.logit(torch.tensor(scores))

    def __call__(self, input_ids, **inputs):
        B, L = input_ids.shape
        logits = self.logits[None, :, None].expand(B, -1, L)  # every token, the query's score
        return SimpleNamespace(logits=logits, pred_boxes=self.boxes[None].expand(B, -1, -1))


def box_segmenter(pixel_values, input_boxes, multimask_output):
    """A SAM stand-in: the mask of a box is the box (+10 inside, −10 outside, at the 64-px input size)."""
    masks = torch.full((len(input_boxes), 1, 1, 64, 64), -10.0)
    for b, (x0, y0, x1, y1) in enumerate(input_boxes[:, 0].round().long().tolist()):
        masks[b, 0, 0, y0:y1, x0:x1] = 10.0
    return SimpleNamespace(pred_masks=masks)


def with_known_boxes(monkeypatch, boxes, scores):
    class Known(prepare_data.Models):
        def __init__(self, *args):
            super().__init__(*args)
            self.detector, self.segmenter = KnownBoxes(boxes, scores), box_segmenter

    monkeypatch.setattr(prepare_data, "Models", Known)


def box_mask(box):
    x0, y0, x1, y1 = box
    mask = np.zeros((64, 64), np.uint8)
    mask[y0:y1, x0:x1] = 255
    return mask


def test_prepare_data_writes_255_on_the_subject_and_0_elsewhere(models, tmp_path, monkeypatch):
    folder = make_folder(tmp_path / "dogs", images={"rex.png": (64, 64)})
    with_known_boxes(monkeypatch, [BOX_A], [0.9])
    prepare_data.main(argv(folder, models))
    np.testing.assert_array_equal(np.asarray(Image.open(folder / "masks" / "rex.png")), box_mask(BOX_A))


def test_the_mask_is_of_the_most_confident_box(models, tmp_path, monkeypatch):
    # A dog in the background (B, found first, less sure) and the dog of the picture (A): the mask is A's.
    folder = make_folder(tmp_path / "dogs", images={"rex.png": (64, 64)})
    with_known_boxes(monkeypatch, [BOX_B, BOX_A, BOX_B], [0.6, 0.9, 0.4])
    prepare_data.main(argv(folder, models, threshold=0.3))
    np.testing.assert_array_equal(np.asarray(Image.open(folder / "masks" / "rex.png")), box_mask(BOX_A))


def test_data_py_reads_the_prepared_folder_with_its_concept(prepared):
    folder, _ = prepared
    ds = data.ImageFolder(data.DataConfig(root=str(folder), resolution=64))
    assert ds.summary.endswith("3 images (split all; captions 3 from captions.jsonl; masks 3 from masks/); nothing skipped")
    item = ds[0]
    assert item["concept"] == "dog" and sorted(item["captions"]) == sorted(DOG_CAPTIONS) and item["mask"].shape == (1, 8, 8)


def test_a_rerun_loads_no_model_and_changes_no_file(prepared, models, monkeypatch, capsys):
    folder, _ = prepared
    before = snapshot(folder)
    monkeypatch.setattr(prepare_data, "Models", lambda *a: pytest.fail("a finished folder must not load models"))
    prepare_data.main(argv(folder, models))
    assert snapshot(folder) == before
    out = capsys.readouterr().out
    assert "3 of 3 images have captions and masks" in out and "(0 made now)" in out


def test_a_killed_run_continues_where_it_stopped_and_ends_equal(prepared, models, tmp_path, monkeypatch):
    folder = make_folder(tmp_path / "dogs")
    real = prepare_data.prepare_batch
    seen = []

    def then_killed(models_, folder_, concept, batch, *rest):
        seen.append(list(batch))
        if len(seen) == 2:
            raise KeyboardInterrupt  # killed after the first batch of two was written
        return real(models_, folder_, concept, batch, *rest)

    monkeypatch.setattr(prepare_data, "prepare_batch", then_killed)
    with pytest.raises(KeyboardInterrupt):
        prepare_data.main(argv(folder, models))
    assert not (folder / "captions.jsonl").exists()  # nothing merged: the run did not finish
    part = folder / ".prepare_data" / "captions.rank0.jsonl"
    assert len(read_jsonl(part)) == 2
    with open(part, "a") as f:
        f.write('{"image": "rex.jpg", "capt')  # and a line cut short by the kill
    seen.clear()
    monkeypatch.setattr(prepare_data, "prepare_batch", lambda *a: seen.append(list(a[3])) or real(*a))
    prepare_data.main(argv(folder, models))
    assert seen == [["rex"]]  # only the image left over
    assert (folder / "captions.jsonl").read_bytes() == (prepared[0] / "captions.jsonl").read_bytes()
    for name in IMAGES:
        mask = os.path.join("masks", os.path.splitext(name)[0] + ".png")
        assert np.array_equal(np.asarray(Image.open(folder / mask)), np.asarray(Image.open(prepared[0] / mask)))


def test_kept_lines_and_masks_are_not_made_again(models, tmp_path, monkeypatch):
    folder = make_folder(tmp_path / "dogs")
    mine = {"image": "rex.jpg", "captions": ["my dog Rex", "Rex the dog"], "concept": "dog"}
    original = json.dumps(mine) + "\n" + "a note of mine, not json"  # a line of the user's without a mask, and a note
    (folder / "captions.jsonl").write_text(original)
    os.makedirs(folder / "masks" / "park")
    Image.fromarray(np.full((80, 64), 255, np.uint8)).save(folder / "masks" / "park" / "bella.png")  # a mask, no line
    asked = []
    real = prepare_data.Models.caption
    monkeypatch.setattr(prepare_data.Models, "caption", lambda self, images, prompts: asked.append(len(images)) or real(self, images, prompts))
    prepare_data.main(argv(folder, models))
    text = (folder / "captions.jsonl").read_text()
    assert text.startswith(original + "\n")  # the user's text is kept byte for byte
    lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    assert lines[0] == mine and [line["image"] for line in lines[1:]] == ["park/bella.png", "park/deep/max.webp"]
    assert np.asarray(Image.open(folder / "masks" / "park" / "bella.png")).min() == 255  # the user's mask, kept
    assert (folder / "masks" / "rex.png").exists()  # the missing mask, made for the kept line
    assert asked == [4, 2]  # two images asked two questions, both re-asked once; rex never


def test_concept_auto_names_the_person_the_caption_names(models, tmp_path):
    folder = make_folder(tmp_path / "people", images={"a.png": (64, 64), "b.png": (64, 64)})
    prepare_data.main(argv(folder, models, concept="auto"))
    for line in read_jsonl(folder / "captions.jsonl"):
        assert line["concept"] == "girl" and line["captions"] == [ANSWERS["image."], ANSWERS["photo."]]


def test_images_where_nothing_is_found_are_skipped_counted_and_not_retried(models, tmp_path, monkeypatch, capsys):
    folder = make_folder(tmp_path / "dogs")
    truncate(folder / "rex.jpg")
    prepare_data.main(argv(folder, models, threshold=1))  # no box scores above 1
    summary = capsys.readouterr().out
    assert "0 of 3 images have captions and masks" in summary
    assert "skipped 3: 2 nothing found, 1 unreadable (delete " in summary
    assert not (folder / "masks").exists() and not (folder / "captions.jsonl").exists()
    monkeypatch.setattr(prepare_data, "Models", lambda *a: pytest.fail("skipped images are not tried again"))
    prepare_data.main(argv(folder, models, threshold=1))
    assert "skipped 3: 2 nothing found, 1 unreadable" in capsys.readouterr().out


def test_torchrun_splits_the_folder_and_ends_equal_to_one_process(prepared, models, tmp_path):
    import socket

    folder = make_folder(tmp_path / "dogs")
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                        os.path.join(ROOT, "prepare_data.py"), *argv(folder, models)],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("prepare_data: 3 of 3 images") == 1  # one summary, from rank 0
    assert sorted(os.listdir(folder / ".prepare_data")) == ["skipped.rank0.jsonl", "skipped.rank1.jsonl"]
    assert (folder / "captions.jsonl").read_bytes() == (prepared[0] / "captions.jsonl").read_bytes()


# ----------------------------------------------------------------------------------------------
# Bad input: one sentence, before any model loads, nothing written


def test_a_folder_without_images_is_one_sentence_before_any_model_loads(models, tmp_path, monkeypatch):
    monkeypatch.setattr(prepare_data, "check_models", lambda *a: pytest.fail("no model is looked at"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"no images \(jpg, jpeg, png, webp\) in"):
        prepare_data.main(argv(tmp_path / "empty", models))
    assert os.listdir(tmp_path / "empty") == []


def test_a_captions_line_for_a_missing_image_is_one_sentence_before_any_model_loads(models, tmp_path, monkeypatch):
    monkeypatch.setattr(prepare_data, "check_models", lambda *a: pytest.fail("no model is looked at"))
    folder = make_folder(tmp_path / "dogs")
    text = json.dumps({"image": "park/gone.jpg", "captions": ["a dog", "the dog"], "concept": "dog"}) + "\n"
    (folder / "captions.jsonl").write_text(text)
    with pytest.raises(UserError, match=r"captions.jsonl has a line for park/gone, which is not an image in "):
        prepare_data.main(argv(folder, models))
    assert (folder / "captions.jsonl").read_text() == text and not (folder / ".prepare_data").exists()


def test_a_captioner_that_is_not_image_to_text_is_one_sentence_before_any_model_loads(models, tmp_path):
    folder = make_folder(tmp_path / "dogs")
    args = argv(folder, models)
    args[args.index("--captioner") + 1] = str(models / "segmenter")
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "prepare_data.py"), *args], capture_output=True, text=True,
                       env=env, cwd=ROOT, timeout=120)
    assert r.returncode != 0
    assert r.stderr.strip().splitlines()[-1] == (f"error: --captioner {models / 'segmenter'} is a sam model, not an "
                                                 f"image-text-to-text model (e.g. {prepare_data.DEFAULT_CAPTIONER})")
    assert sorted(os.listdir(folder)) == ["notes.txt", "park", "rex.jpg"]


# ----------------------------------------------------------------------------------------------
# The concept-word rules


@pytest.mark.parametrize("caption, concept, ok", [
    ("a dog on the grass", "dog", True),
    ("A Dog on the grass", "dog", True),
    ("a dog next to another dog", "dog", False),  # twice: which one would the pseudo-word go before?
    ("a cat on the grass", "dog", False),  # not at all
    ("a womanly smile", "woman", False),  # inside another word
    ("a woman with a womanly smile", "woman", True),
    ("a teddy bear on a bed", "teddy bear", True),  # several tokens
    ("a teddy on a bed", "teddy bear", False),
])
def test_a_caption_names_the_concept_exactly_once_as_a_whole_word(caption, concept, ok):
    assert prepare_data.caption_names_concept(caption, concept) is ok


def test_a_caption_equal_to_an_earlier_one_does_not_count():
    assert not prepare_data.caption_names_concept("A dog.", "dog", ["a dog."])
    assert prepare_data.caption_names_concept("a dog running", "dog", ["a dog."])


@pytest.mark.parametrize("caption, male, concept", [
    ("a young girl smiling", True, "girl"),  # attributes cannot say girl
    ("a woman smiling", True, "man"),  # but CelebA's labels win over the captioner for man / woman
    ("a woman smiling", None, "woman"),
    ("a person in a hat", False, "woman"),
    ("a person in a hat", None, "person"),
    ("someone smiling", None, "person"),
    ("a manly womanly figure", None, "person"),
])
def test_concept_auto_chooses_from_caption_and_attributes(caption, male, concept):
    assert prepare_data.choose_concept(caption, male) == concept


# ----------------------------------------------------------------------------------------------
# Training on the prepared folder


def test_train_py_trains_a_few_steps_on_the_prepared_dog_folder(prepared, tmp_path):
    from tests.tiny_sdxl import save_tiny_sdxl

    folder = tmp_path / "dogs"
    shutil.copytree(prepared[0], folder)
    _, _, weights = save_tiny_sdxl(str(tmp_path / "sdxl"))
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    args = ["--data", folder, "--weights", weights, "--out", out, "--resolution", 64, "--batch-size", 1, "--steps", 2,
            "--num-workers", 0, "--device", "cpu", "--sample-every", 0]
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *map(str, args)], capture_output=True, text=True,
                       env=env, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "image folder at" in r.stdout + r.stderr and "captions 3 from captions.jsonl; masks 3 from masks/" in r.stdout + r.stderr
    log = read_jsonl(out / "log.jsonl")
    assert [line["step"] for line in log] == [1, 2] and all(np.isfinite(line["loss"]) for line in log)
    assert (out / "mapper.safetensors").exists()
