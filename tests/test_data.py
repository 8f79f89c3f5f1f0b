"""data.py on small CelebA-like folders built here, in every layout, with broken files among them."""

import json
import os
import pickle
import random
import re

import numpy as np
import pytest
import torch
from PIL import Image

import data
import folders
from data import DataConfig, ImageFolder, LatentCache, collate
from model.errors import UserError

# The 40 attributes in the column order of CelebA's list_attr_celeba.txt.
ATTRIBUTES = (
    "5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose Black_Hair "
    "Blond_Hair Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee Gray_Hair Heavy_Makeup "
    "High_Cheekbones Male Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard Oval_Face Pale_Skin Pointy_Nose "
    "Receding_Hairline Rosy_Cheeks Sideburns Smiling Straight_Hair Wavy_Hair Wearing_Earrings Wearing_Hat "
    "Wearing_Lipstick Wearing_Necklace Wearing_Necktie Young"
).split()
LANDMARK_HEADER = "lefteye_x lefteye_y righteye_x righteye_y nose_x nose_y leftmouth_x leftmouth_y rightmouth_x rightmouth_y"
# A typical aligned CelebA face (178 x 218): eyes, nose, mouth corners.
LANDMARKS = (69, 109, 106, 113, 77, 142, 73, 152, 108, 154)


def attr_values(**on):
    """A row of 40 values, -1 except the named attributes (Male=1 ...)."""
    return [on.get(name, -1) for name in ATTRIBUTES]


def save_image(path, w=178, h=218, seed=0):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=95)


def truncate(path):
    with open(path, "rb") as f:
        content = f.read()
    with open(path, "wb") as f:
        f.write(content[: len(content) // 2])


def write_table(path, rows, header=None, count=True):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        if count:
            f.write(f"{len(rows)}\n")
        if header:
            f.write(header + "\n")
        for name, values in rows:
            f.write(name + "  " + " ".join(f"{v:>2}" for v in values) + "\n")


def make_celeba(root, n=6, images="img_align_celeba", anno=".", evaluation=".", attrs=None, partition=None):
    """An official-format CelebA: n good images 000001..; returns the file names."""
    names = [f"{k:06d}.jpg" for k in range(1, n + 1)]
    for k, name in enumerate(names):
        save_image(os.path.join(root, images, name), seed=k)
    attrs = attrs or {}
    write_table(
        os.path.join(root, anno, "list_attr_celeba.txt"),
        [(name, attrs.get(name, attr_values(Male=1, Young=1))) for name in names],
        header=" ".join(ATTRIBUTES),
    )
    write_table(os.path.join(root, anno, "list_landmarks_align_celeba.txt"), [(name, LANDMARKS) for name in names], header=LANDMARK_HEADER)
    partition = partition or [0] * n
    write_table(os.path.join(root, evaluation, "list_eval_partition.txt"), list(zip(names, [[p] for p in partition])), count=False)
    return names


def append_line(path, line):
    with open(path, "a") as f:
        f.write(line + "\n")


def dataset(root, **kw):
    cache = kw.pop("cache", None)
    return ImageFolder(DataConfig(root=str(root), resolution=kw.pop("resolution", 64), **kw), cache=cache)


def test_official_flat_layout_counts_missing_unreadable_and_unannotated_in_one_summary_line(tmp_path):
    make_celeba(tmp_path, n=6)
    truncate(tmp_path / "img_align_celeba" / "000002.jpg")
    # An annotated image whose file is missing, a malformed attribute line, an image without any annotation.
    append_line(tmp_path / "list_attr_celeba.txt", "000007.jpg " + " ".join(map(str, attr_values())))
    append_line(tmp_path / "list_attr_celeba.txt", "000008.jpg 1 -1 1")
    save_image(str(tmp_path / "img_align_celeba" / "000008.jpg"))
    save_image(str(tmp_path / "img_align_celeba" / "000009.jpg"))
    # a landmark row with a non-number: 000006 has captions but no mask source left
    landmarks = (tmp_path / "list_landmarks_align_celeba.txt").read_text().replace("000006.jpg  69", "000006.jpg  6x")
    (tmp_path / "list_landmarks_align_celeba.txt").write_text(landmarks)
    ds = dataset(tmp_path)
    assert ds.layout.name == "official CelebA (flat)"
    assert len(ds) == 4
    assert "\n" not in ds.summary
    assert ds.summary.endswith("skipped 5 of 9 images: 1 missing, 1 unreadable, 3 without annotations")
    assert "captions 4 from attributes; masks 4 from head ellipses" in ds.summary
    assert [item[0] for item in ds.items] == [f"img_align_celeba/{k:06d}.jpg" for k in (1, 3, 4, 5)]
    assert [ds[i]["key"] for i in range(4)] == [item[0] for item in ds.items]


def test_img_anno_eval_layout_with_train_split_keeps_partition_zero(tmp_path):
    root = tmp_path / "CelebA"
    make_celeba(root, n=6, images="Img/img_align_celeba", anno="Anno", evaluation="Eval", partition=[0, 0, 1, 0, 2, 0])
    ds = dataset(tmp_path, split="train")
    assert ds.layout.name == "official CelebA (Img/Anno/Eval)"
    assert [item[0] for item in ds.items] == [f"Img/img_align_celeba/{k:06d}.jpg" for k in (1, 2, 4, 6)]
    assert "nothing skipped" in ds.summary
    assert len(dataset(tmp_path, split="test")) == 1
    assert len(dataset(tmp_path)) == 6


def test_torchvision_celeba_nesting_is_detected(tmp_path):
    make_celeba(tmp_path / "celeba", n=3)
    # an attribute value that is neither 1, -1 nor 0 marks the row as broken
    attrs = tmp_path / "celeba" / "list_attr_celeba.txt"
    attrs.write_text(attrs.read_text().replace("000003.jpg  -1", "000003.jpg   2"))
    ds = dataset(tmp_path)
    assert ds.layout.name == "torchvision CelebA (celeba/)"
    assert len(ds) == 2 and ds[0]["key"] == "img_align_celeba/000001.jpg"
    assert ds.summary.endswith("skipped 1 of 3 images: 1 without annotations")


def test_kaggle_csv_tables_and_doubly_nested_images_are_read(tmp_path):
    names = [f"{k:06d}.jpg" for k in range(1, 4)]
    for k, name in enumerate(names):
        save_image(str(tmp_path / "img_align_celeba" / "img_align_celeba" / name), seed=k)
    rows = [attr_values(Male=1), attr_values(), attr_values(Male=1)]
    with open(tmp_path / "list_attr_celeba.csv", "w") as f:
        f.write("image_id," + ",".join(ATTRIBUTES) + "\n")
        f.writelines(f"{n}," + ",".join(map(str, r)) + "\n" for n, r in zip(names, rows))
    with open(tmp_path / "list_landmarks_align_celeba.csv", "w") as f:
        f.write("image_id," + LANDMARK_HEADER.replace(" ", ",") + "\n")
        f.writelines(f"{n}," + ",".join(map(str, LANDMARKS)) + "\n" for n in names)
    ds = dataset(tmp_path)
    assert ds.layout.name == "Kaggle CelebA"
    assert [ds[i]["concept"] for i in range(3)] == ["man", "woman", "man"]


def test_empty_folder_and_folder_with_nothing_usable_raise_one_user_error(tmp_path):
    with pytest.raises(UserError, match=r"no CelebA found in .*img_align_celeba/.*list_attr_celeba.txt.*CelebA-HQ-img/"):
        dataset(tmp_path)
    (tmp_path / "img_align_celeba").mkdir()
    with pytest.raises(UserError, match="nothing usable"):
        dataset(tmp_path)
    save_image(str(tmp_path / "img_align_celeba" / "000001.jpg"))
    with pytest.raises(UserError, match=r"nothing usable .*1 without annotations"):
        dataset(tmp_path)
    make_celeba(tmp_path, n=1)
    with pytest.raises(UserError, match="multiple of 8"):
        dataset(tmp_path, resolution=60)
    with pytest.raises(UserError, match="split"):
        dataset(tmp_path, split="training")
    with pytest.raises(UserError, match="crop"):
        dataset(tmp_path, crop="left")
    make_hq(tmp_path / "CelebAMask-HQ", n=1)
    with pytest.raises(UserError, match="list_eval_partition.txt.*use split all"):
        dataset(tmp_path / "CelebAMask-HQ", split="train")


# ----------------------------------------------------------------------------------------------
# Captions


def test_phrase_tables_name_only_official_attributes():
    used = set(data._ADJECTIVES) | set(data._HAIR_COLORS) | set(data._HAIR_STYLES) | set(data._WITH) | set(data._WEARING)
    assert used <= set(ATTRIBUTES)
    # Everything but the concept's Male, the beard's No_Beard, Bald, Smiling and the two photo judgements.
    assert set(ATTRIBUTES) - used == {"Male", "No_Beard", "Bald", "Smiling", "Attractive", "Blurry"}


@pytest.mark.parametrize(
    "on, concept",
    [({"Male": 1, "Young": 1}, "man"), ({"Male": 1}, "man"), ({"Young": 1}, "woman"), ({}, "woman")],
)
def test_attribute_captions_are_two_different_captions_naming_the_concept(on, concept):
    attrs = {name: v > 0 for name, v in zip(ATTRIBUTES, attr_values(**on, Smiling=1, Wavy_Hair=1, Black_Hair=1, Eyeglasses=1))}
    for seed in range(50):
        (p1, p2), c = data.attribute_captions(attrs, random.Random(seed))
        assert c == concept and p1 != p2
        for p in (p1, p2):
            assert len(re.findall(rf"\b{concept}\b", p)) == 1, p
            assert "boy" not in p and "girl" not in p
            assert "blond" not in p and "a hat" not in p  # only true attributes are described


def test_bald_heads_get_no_hair_colour():
    attrs = {"Male": True, "Bald": True, "Black_Hair": True}
    for seed in range(10):
        (p1, p2), _ = data.attribute_captions(attrs, random.Random(seed))
        assert "black hair" not in p1 + p2 and "a bald head" in p1 + p2


def test_attribute_captions_without_male_column_use_person():
    (p1, p2), concept = data.attribute_captions({"Young": True, "Smiling": True}, random.Random(0))
    assert concept == "person" and "person" in p1 and "person" in p2


def test_captions_depend_on_seed_and_epoch_but_repeat_for_the_same_epoch(tmp_path):
    attrs = {f"{k:06d}.jpg": attr_values(Male=1, Young=1, Smiling=1, Black_Hair=1, Goatee=1, Eyeglasses=1) for k in range(1, 7)}
    make_celeba(tmp_path, n=6, attrs=attrs)
    ds = dataset(tmp_path)
    first = [ds[i]["captions"] for i in range(6)]
    assert first == [ds[i]["captions"] for i in range(6)]
    ds.set_epoch(1)
    assert first != [ds[i]["captions"] for i in range(6)]


def test_captions_jsonl_wins_and_broken_lines_fall_back_to_attributes(tmp_path):
    make_celeba(tmp_path, n=4, attrs={"000003.jpg": attr_values(Male=1)})
    lines = [
        {"image": "000001.jpg", "captions": ["a girl reading", "a girl in a park", "a smiling girl"], "concept": "girl"},
        # only one caption names the concept: falls back to the attributes
        {"image": "000003.jpg", "captions": ["a woman reading", "someone in a park"], "concept": "woman"},
    ]
    with open(tmp_path / "captions.jsonl", "w") as f:
        f.writelines(json.dumps(line) + "\n" for line in lines)
        f.write("{not json\n")
    ds = dataset(tmp_path)
    assert "captions 3 from attributes, 1 from captions.jsonl" in ds.summary
    for epoch in range(5):
        ds.set_epoch(epoch)
        item = ds[0]
        assert item["concept"] == "girl" and item["captions"][0] != item["captions"][1]
        assert set(item["captions"]) <= set(lines[0]["captions"])
    assert ds[2]["concept"] == "man"


def test_captions_jsonl_yields_every_pair_of_its_captions_in_both_orders_across_epochs(tmp_path):
    make_celeba(tmp_path, n=1)
    captions = ["a girl reading", "a girl in a park", "a smiling girl", "a girl with a kite"]
    with open(tmp_path / "captions.jsonl", "w") as f:
        f.write(json.dumps({"image": "000001.jpg", "captions": captions, "concept": "girl"}) + "\n")
    ds = dataset(tmp_path)
    drawn = set()
    for epoch in range(60):
        ds.set_epoch(epoch)
        drawn.add(ds[0]["captions"])
    # Of the 12 ordered pairs of 4 captions, these 60 epochs (fixed by seed, epoch and image) draw all.
    assert len(drawn) == 12


def test_concepts_count_the_word_each_image_is_trained_with(tmp_path):
    # What a mapper file records it was trained on: the same word every item carries, counted.
    make_celeba(tmp_path, n=4, attrs={"000002.jpg": attr_values(), "000003.jpg": attr_values(Male=1)})
    with open(tmp_path / "captions.jsonl", "w") as f:
        f.write(json.dumps({"image": "000001.jpg", "captions": ["a girl reading", "a girl in a park"],
                            "concept": "girl"}) + "\n")
    ds = dataset(tmp_path)
    assert ds.concepts() == {"man": 2, "girl": 1, "woman": 1}
    assert sorted(ds[i]["concept"] for i in range(len(ds))) == ["girl", "man", "man", "woman"]
    assert list(ds.concepts()) == ["man", "girl", "woman"]  # most common first, ties in order of appearance


def test_captions_failing_the_caption_test_are_dropped_before_training(tmp_path):
    make_celeba(tmp_path, n=2)
    lines = [{"image": "000001.jpg", "concept": "girl",
              "captions": ["a girl reading", "a girl in a park", "LONG " * 80 + "a girl at the end"]}]
    with open(tmp_path / "captions.jsonl", "w") as f:
        f.writelines(json.dumps(line) + "\n" for line in lines)
    ds = ImageFolder(DataConfig(root=str(tmp_path), resolution=64), caption_ok=lambda caption, concept: len(caption) < 100)
    for epoch in range(6):
        ds.set_epoch(epoch)
        assert set(ds[0]["captions"]) == {"a girl reading", "a girl in a park"}


# ----------------------------------------------------------------------------------------------
# Geometry and masks


def test_center_crop_and_time_ids_follow_sdxl_convention(tmp_path):
    make_celeba(tmp_path, n=1)
    item = dataset(tmp_path, resolution=64)[0]
    # 178 x 218 -> 64 x 78 (shorter side to 64, longer truncated), center crop from row round(14 / 2) = 7
    assert item["time_ids"].tolist() == [218, 178, 7, 0, 64, 64]
    source = Image.open(tmp_path / "img_align_celeba" / "000001.jpg").convert("RGB")
    expected = np.asarray(source.resize((64, 78), Image.BICUBIC).crop((0, 7, 64, 71)), dtype=np.float32) / 127.5 - 1
    assert item["image"].shape == (3, 64, 64) and item["image"].dtype == torch.float32
    assert torch.allclose(item["image"].permute(1, 2, 0), torch.from_numpy(expected), atol=2 / 255)
    assert item["image"].min() >= -1 and item["image"].max() <= 1
    assert item["mask"].shape == (1, 8, 8)


def test_square_crop_offsets_match_torchvision_rounding():
    # landscape: 100 x 300 -> 64 x 192, left = 64
    crop = data.square_crop(100, 300, 64)
    assert (crop.top, crop.left) == (0, 64)
    assert crop.box == pytest.approx((100, 0, 200, 100))
    # (201 - 100) / 2 = 50.5 and 51.5 round to even, as torchvision's CenterCrop does
    assert data.square_crop(201, 100, 100).top == 50
    assert data.square_crop(203, 100, 100).top == 52
    # 218 * 128 / 178 = 156.8 is truncated to 156 (torchvision's Resize), so rows scale by 218 / 156
    crop = data.square_crop(218, 178, 128)
    assert crop.top == 14 and crop.box[3] == pytest.approx((14 + 128) * 218 / 156)


def test_random_crop_stays_inside_and_changes_with_epoch(tmp_path):
    make_celeba(tmp_path, n=6)
    ds = dataset(tmp_path, crop="random", resolution=64)
    tops = []
    for epoch in range(4):
        ds.set_epoch(epoch)
        for i in range(6):
            item = ds[i]
            h, w, top, left, th, tw = item["time_ids"].tolist()
            assert (h, w, left, th, tw) == (218, 178, 0, 64, 64) and 0 <= top <= 14
            assert item["time_ids"].tolist() == ds[i]["time_ids"].tolist()
            tops.append(top)
    assert len(set(tops)) > 3


def test_a_given_mask_follows_the_random_crop_of_its_image(tmp_path):
    # A 192 x 64 image, white on its subject (a stripe, columns 80..120) and black elsewhere, with the
    # same stripe as its mask: whatever the random crop, the mask must cover the crop's white pixels.
    pixels = np.zeros((64, 192, 3), np.uint8)
    pixels[:, 80:120] = 255
    Image.fromarray(pixels).save(tmp_path / "a.png")
    os.makedirs(tmp_path / "masks")
    Image.fromarray(pixels[..., 0]).save(tmp_path / "masks" / "a.png")
    with open(tmp_path / "captions.jsonl", "w") as f:
        f.write(json.dumps({"image": "a.png", "captions": ["a dog", "the dog"], "concept": "dog"}) + "\n")
    ds = dataset(tmp_path, crop="random", resolution=64)
    lefts = set()
    for epoch in range(8):
        ds.set_epoch(epoch)
        item = ds[0]
        lefts.add(int(item["time_ids"][3]))
        white = (item["image"][0] + 1) / 2  # 1 on the subject's pixels of this crop
        expected = torch.nn.functional.avg_pool2d(white[None, None], 8)[0, 0]  # their share of each latent cell
        assert torch.allclose(item["mask"][0], expected, atol=0.02), (epoch, item["time_ids"])
    assert len(lefts) >= 4  # the crop did move (a centred one starts at column 64)


def test_landmark_ellipse_covers_eyes_and_mouth_not_the_corners(tmp_path):
    make_celeba(tmp_path, n=1)
    item = dataset(tmp_path, resolution=128)[0]
    mask = item["mask"][0]
    assert mask.shape == (16, 16)
    scale, top = 128 / 178, int(round((int(128 * 218 / 178) - 128) / 2))
    for x, y in np.array(LANDMARKS).reshape(5, 2):
        assert mask[int((y * scale - top) / 8), int(x * scale / 8)] == 1.0
    for corner in (mask[0, 0], mask[0, -1], mask[-1, 0], mask[-1, -1]):
        assert corner == 0.0
    cell = lambda x, y: mask[int((y * scale - top) / 8), int(x * scale / 8)]
    # the hair above the forehead is subject, the neck below the chin (at y ≈ 187) is not
    assert cell(88, 60) == 1.0 and cell(88, 196) == 0.0
    # the head, not the whole image: CelebA's faces with hair cover about half of the crop
    assert 0.3 < mask.mean() < 0.75


def make_hq(root, n=3, size=128):
    """CelebAMask-HQ: N.jpg at `size` (part masks go at size / 2, as 512 for 1024), attributes as 1 / 0."""
    for k in range(n):
        save_image(str(root / "CelebA-HQ-img" / f"{k}.jpg"), w=size, h=size, seed=k)
    lines = [f"{k}.jpg " + " ".join(str(max(v, 0)) for v in attr_values(Male=k % 2)) for k in range(n)]
    with open(root / "CelebAMask-HQ-attribute-anno.txt", "w") as f:
        f.write(f"{len(lines)}\n" + " ".join(ATTRIBUTES) + "\n" + "\n".join(lines) + "\n")


def save_part(root, k, part, box, size=64):
    part_mask = np.zeros((size, size), np.uint8)
    x0, y0, x1, y1 = box
    part_mask[y0:y1, x0:x1] = 255
    path = root / "CelebAMask-HQ-mask-anno" / str(k // 2000) / f"{k:05d}_{part}.png"
    os.makedirs(path.parent, exist_ok=True)
    Image.fromarray(part_mask).save(path)


def test_celeba_hq_mask_is_the_union_of_face_and_hair_parts_at_latent_resolution(tmp_path):
    root = tmp_path / "CelebAMask-HQ"
    make_hq(root, n=3)  # attribute values written as 1 / 0
    save_part(root, 0, "skin", (16, 16, 48, 48))
    save_part(root, 0, "hair", (8, 0, 56, 16))
    save_part(root, 0, "l_eye", (20, 24, 28, 28))
    save_part(root, 0, "cloth", (0, 48, 64, 64))  # not subject
    save_part(root, 0, "hat", (0, 0, 8, 8))  # not subject
    save_part(root, 1, "skin", (0, 0, 32, 32))
    # image 2000 keeps its parts in the next folder of 2000
    save_image(str(root / "CelebA-HQ-img" / "2000.jpg"), w=128, h=128)
    append_line(root / "CelebAMask-HQ-attribute-anno.txt", "2000.jpg " + " ".join(map(str, attr_values())))
    save_part(root, 2000, "hair", (0, 0, 64, 8))
    ds = dataset(tmp_path, resolution=64)
    assert ds.layout.name == "CelebA-HQ"
    assert "masks 3 from CelebAMask-HQ parts, 1 from head ellipses" in ds.summary
    assert ds[3]["key"] == "CelebA-HQ-img/2000.jpg" and ds[3]["mask"][0, 0].tolist() == [1.0] * 8
    item = ds[0]
    assert item["time_ids"].tolist() == [128, 128, 0, 0, 64, 64]
    expected = np.zeros((64, 64), np.float32)
    expected[16:48, 16:48] = 1
    expected[0:16, 8:56] = 1
    expected = expected.reshape(8, 8, 8, 8).mean(axis=(1, 3))  # 64 px part mask -> 8 x 8 latent cells
    assert np.allclose(item["mask"][0].numpy(), expected)
    assert item["mask"][0, 7].sum() == 0 and item["mask"][0, 0, 0] == 0
    assert np.allclose(ds[1]["mask"][0].numpy(), np.pad(np.ones((4, 4)), ((0, 4), (0, 4))))
    # without parts, CelebA-HQ's fixed alignment puts the head in the middle
    ellipse = ds[2]["mask"][0]
    assert ellipse[4, 4] == 1 and ellipse[0, 0] == 0
    # 1 / 0 attribute values: Male=1 -> man, Male=0 -> woman
    assert [ds[k]["concept"] for k in range(3)] == ["woman", "man", "woman"]


def test_given_mask_goes_through_the_image_crop_and_wins_over_landmarks(tmp_path):
    make_celeba(tmp_path, n=2)
    given = np.zeros((218, 178), np.uint8)
    given[:109, :89] = 1  # 0 / 1 masks count too: any nonzero pixel is subject
    os.makedirs(tmp_path / "masks")
    Image.fromarray(given).save(tmp_path / "masks" / "000001.png")
    ds = dataset(tmp_path, resolution=64)
    assert "masks 1 from head ellipses, 1 from masks/" in ds.summary
    mask = ds[0]["mask"][0]
    # 178 x 218 -> 64 x 78, crop rows 7..71: source rows < 109 are resized rows < 39, crop rows < 32,
    # latent rows < 4; columns < 89 are latent columns < 4. Ignoring the crop would give row 4 a 7/8.
    expected = torch.zeros(8, 8)
    expected[:4, :4] = 1
    assert torch.allclose(mask, expected, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Latent cache


class CountingEncoder:
    """A stand-in VAE: (B, 3, R, R) -> (B, 4, R/8, R/8), counting its calls."""

    def __init__(self, offset=0.0):
        self.calls, self.images, self.offset = 0, 0, offset

    def __call__(self, x):
        self.calls += 1
        self.images += len(x)
        pooled = torch.nn.functional.avg_pool2d(x, 8)
        return torch.cat([pooled, pooled.mean(1, keepdim=True)], dim=1) + self.offset


def epoch_latents(ds, cache, epoch):
    ds.set_epoch(epoch)
    loader = torch.utils.data.DataLoader(ds, batch_size=len(ds), collate_fn=collate)
    (batch,) = list(loader)
    return batch, cache.fill(batch)


def test_latent_cache_encodes_each_image_once_across_epochs(tmp_path):
    make_celeba(tmp_path / "celeba", n=4)
    encoder = CountingEncoder()
    cache = LatentCache(str(tmp_path / "cache"), encoder, ["vae=a"])
    ds = dataset(tmp_path / "celeba", cache=cache)
    batch, first = epoch_latents(ds, cache, 0)
    assert (encoder.calls, encoder.images) == (1, 4)
    assert batch["latent"] is None and batch["image_rows"].tolist() == [0, 1, 2, 3]
    batch, second = epoch_latents(ds, cache, 1)
    assert (encoder.calls, encoder.images) == (1, 4)
    assert batch["image"] is None and batch["latent_rows"].tolist() == [0, 1, 2, 3]
    assert first.shape == (4, 4, 8, 8) and torch.equal(first, second)
    assert torch.equal(first, CountingEncoder()(torch.stack([dataset(tmp_path / "celeba")[i]["image"] for i in range(4)])))
    leftovers = [f for _, _, files in os.walk(tmp_path / "cache") for f in files if f.endswith(".tmp")]
    assert leftovers == []


def test_latent_cache_recomputes_a_changed_file_resolution_or_vae(tmp_path):
    make_celeba(tmp_path / "celeba", n=3)
    encoder = CountingEncoder()
    cache = LatentCache(str(tmp_path / "cache"), encoder, ["vae=a"])
    epoch_latents(dataset(tmp_path / "celeba", cache=cache), cache, 0)
    assert encoder.images == 3
    # a changed image file: only that one is encoded again
    save_image(str(tmp_path / "celeba" / "img_align_celeba" / "000002.jpg"), seed=99)
    batch, _ = epoch_latents(dataset(tmp_path / "celeba", cache=cache), cache, 0)
    assert encoder.images == 4 and batch["image_rows"].tolist() == [1]
    # another resolution: all again, at the new size
    _, latents = epoch_latents(dataset(tmp_path / "celeba", cache=cache, resolution=32), cache, 0)
    assert encoder.images == 7 and latents.shape == (3, 4, 4, 4)
    # another VAE fingerprint: all again, and its latents, not the old ones
    other = CountingEncoder(offset=1.0)
    cache_b = LatentCache(str(tmp_path / "cache"), other, ["vae=b"])
    _, latents_b = epoch_latents(dataset(tmp_path / "celeba", cache=cache_b), cache_b, 0)
    _, latents_a = epoch_latents(dataset(tmp_path / "celeba", cache=cache), cache, 1)
    assert other.images == 3 and encoder.images == 7
    assert torch.allclose(latents_b - 1.0, latents_a, atol=1e-6)


def test_latent_cache_keys_the_resolution_even_where_the_crop_is_the_same(tmp_path):
    make_hq(tmp_path / "hq", n=2)  # square images: crop (0, 0) at every resolution
    encoder = CountingEncoder()
    cache = LatentCache(str(tmp_path / "cache"), encoder, ["vae=a"])
    _, small = epoch_latents(dataset(tmp_path / "hq", cache=cache, resolution=32), cache, 0)
    _, large = epoch_latents(dataset(tmp_path / "hq", cache=cache, resolution=64), cache, 0)
    assert encoder.images == 4 and small.shape == (2, 4, 4, 4) and large.shape == (2, 4, 8, 8)


def test_damaged_cache_entry_is_encoded_again(tmp_path):
    make_celeba(tmp_path / "celeba", n=2)
    encoder = CountingEncoder()
    cache = LatentCache(str(tmp_path / "cache"), encoder, ["vae=a"])
    batch, before = epoch_latents(dataset(tmp_path / "celeba", cache=cache), cache, 0)
    with open(cache.path(batch["cache_key"][0]), "wb") as f:
        f.write(b"garbage")
    batch, after = epoch_latents(dataset(tmp_path / "celeba", cache=cache), cache, 1)
    assert batch["image_rows"].tolist() == [0] and encoder.images == 3
    assert torch.equal(before, after)


def test_dataset_with_cache_pickles_for_worker_processes_without_the_encoder(tmp_path):
    make_celeba(tmp_path / "celeba", n=2)
    cache = LatentCache(str(tmp_path / "cache"), lambda x: torch.zeros(len(x), 4, 8, 8), ["vae=a"])
    ds = dataset(tmp_path / "celeba", cache=cache)
    epoch_latents(ds, cache, 0)
    worker_copy = pickle.loads(pickle.dumps(ds))  # a lambda would not pickle
    assert worker_copy.cache.encode_fn is None
    assert torch.equal(worker_copy[0]["latent"], torch.zeros(4, 8, 8))


# ----------------------------------------------------------------------------------------------
# Failures after start-up


def test_image_that_fails_after_start_up_is_replaced_by_the_next_one_with_a_warning(tmp_path):
    make_celeba(tmp_path, n=3)
    ds = dataset(tmp_path)
    os.remove(tmp_path / "img_align_celeba" / "000002.jpg")
    with pytest.warns(RuntimeWarning, match="000002.jpg"):
        item = ds[1]
    assert item["key"] == "img_align_celeba/000003.jpg"
    assert ds[1]["key"] == "img_align_celeba/000003.jpg"


def test_image_readability_check_catches_truncated_and_accepts_trailing_bytes(tmp_path):
    good, cut, padded, png = (str(tmp_path / n) for n in ("good.jpg", "cut.jpg", "padded.jpg", "mask.png"))
    for path in (good, cut, padded):
        save_image(path)
    truncate(cut)
    with open(padded, "ab") as f:
        f.write(b"\x00" * 100)  # some cameras append data after the end marker
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(png)
    assert folders.image_is_readable(good) and folders.image_is_readable(padded) and folders.image_is_readable(png)
    assert not folders.image_is_readable(cut)
    assert not folders.image_is_readable(str(tmp_path / "absent.jpg"))


# ----------------------------------------------------------------------------------------------
# Any image folder, any concept


DOG_CAPTIONS = ["a dog on the grass", "a brown dog lying in the sun", "a photo of a sleepy dog"]


def make_image_folder(root, names=("rex.jpg", "park/bella.png", "park/deep/max.webp"), size=(96, 64), concept="dog"):
    """A folder of images in subfolders with captions.jsonl and masks/ as prepare_data.py writes them;
    each mask marks the left half of its image."""
    w, h = size
    with open(os.path.join(root, "captions.jsonl"), "w") as f:
        for k, name in enumerate(names):
            save_image(os.path.join(root, name), w=w, h=h, seed=k)
            mask = np.zeros((h, w), np.uint8)
            mask[:, : w // 2] = 255
            mask_path = os.path.join(root, "masks", os.path.splitext(name)[0] + ".png")
            os.makedirs(os.path.dirname(mask_path), exist_ok=True)
            Image.fromarray(mask).save(mask_path)
            f.write(json.dumps({"image": name, "captions": DOG_CAPTIONS, "concept": concept}) + "\n")
    return list(names)


def test_a_plain_image_folder_in_subfolders_reads_with_its_concept_from_captions_jsonl(tmp_path):
    make_image_folder(str(tmp_path))
    ds = dataset(tmp_path)
    assert ds.layout.name == "image folder"
    assert [item[0] for item in ds.items] == ["park/bella.png", "park/deep/max.webp", "rex.jpg"]
    assert ds.summary.endswith("3 images (split all; captions 3 from captions.jsonl; masks 3 from masks/); nothing skipped")
    for i in range(3):
        item = ds[i]
        assert item["concept"] == "dog" and set(item["captions"]) <= set(DOG_CAPTIONS)
        assert item["captions"][0] != item["captions"][1]
        # 96 x 64 -> 96 x 64 at R = 64 (already the shorter side), center crop from column 16: the
        # mask's left half (columns < 48) covers crop columns < 32, latent columns < 4.
        assert item["time_ids"].tolist() == [64, 96, 0, 16, 64, 64]
        expected = torch.zeros(8, 8)
        expected[:, :4] = 1
        assert torch.equal(item["mask"][0], expected)
    batch = collate([ds[0], ds[1]])
    assert batch["concept"] == ["dog", "dog"] and batch["image"].shape == (2, 3, 64, 64)


def test_a_multi_word_concept_in_a_plain_folder(tmp_path):
    make_image_folder(str(tmp_path), names=("a.jpg", "b.jpg"), concept="teddy bear")
    lines = [json.loads(line) for line in open(tmp_path / "captions.jsonl")]
    with open(tmp_path / "captions.jsonl", "w") as f:
        for line in lines:
            line["captions"] = ["a teddy bear on a bed", "a worn Teddy  Bear", "a bear"]  # the last lacks "teddy"
            f.write(json.dumps(line) + "\n")
    ds = dataset(tmp_path)
    for epoch in range(4):
        ds.set_epoch(epoch)
        assert set(ds[0]["captions"]) == {"a teddy bear on a bed", "a worn Teddy  Bear"} and ds[0]["concept"] == "teddy bear"


def test_the_toy_world_export_reads_without_attribute_or_landmark_tables(tmp_path):
    # img_align_celeba/*.png, captions.jsonl, masks/*.png, identity and partition tables only
    names = [f"{k:06d}.png" for k in range(1, 5)]
    for k, name in enumerate(names):
        save_image(str(tmp_path / "img_align_celeba" / name), w=32, h=32, seed=k)
    os.makedirs(tmp_path / "masks")
    with open(tmp_path / "captions.jsonl", "w") as f:
        for name in names:
            Image.fromarray(np.full((32, 32), 255, np.uint8)).save(tmp_path / "masks" / name)
            f.write(json.dumps({"image": name, "captions": ["a red woman", "a woman on a beach"], "concept": "woman"}) + "\n")
    write_table(str(tmp_path / "identity_CelebA.txt"), [(n, [k % 2]) for k, n in enumerate(names)], count=False)
    write_table(str(tmp_path / "list_eval_partition.txt"), [(n, [0 if k < 3 else 2]) for k, n in enumerate(names)], count=False)
    ds = dataset(tmp_path, resolution=32)
    assert ds.layout.name == "official CelebA (flat)" and ds.layout.attributes is None and ds.layout.landmarks is None
    assert "4 images (split all; captions 4 from captions.jsonl; masks 4 from masks/); nothing skipped" in ds.summary
    assert ds[0]["concept"] == "woman" and ds[0]["mask"].min() == 1
    assert [item[0] for item in dataset(tmp_path, resolution=32, split="test").items] == ["img_align_celeba/000004.png"]


@pytest.mark.parametrize("caption, concept, count", [
    ("a woman reading", "woman", 1),
    ("a womanly figure", "woman", 0),  # inside another word
    ("a superwoman", "woman", 0),
    ("A Woman's hat, and another woman", "woman", 2),
    ("a person", "woman", 0),
    ("a teddy bear and a bear", "teddy bear", 1),  # several tokens
    ("a teddy\nbear", "teddy bear", 1),
    ("a teddy bears' picnic", "teddy bear", 0),
    ("a t-rex roaring", "t-rex", 1),
    ("anything", "", 0),
])
def test_the_concept_counts_only_as_a_whole_word(caption, concept, count):
    assert data.count_concept(caption, concept) == count


def test_a_folder_without_images_is_one_sentence(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("no pictures here")
    with pytest.raises(UserError, match=r"^no CelebA found in .* and no images \(jpg, jpeg, png, webp\) in it") as e:
        dataset(tmp_path)
    assert str(e.value).count(". ") == 0
    (tmp_path / "captions.jsonl").write_text("")
    with pytest.raises(UserError, match=r"^no images \(jpg, jpeg, png, webp\) in .* or its subfolders$"):
        dataset(tmp_path)
    with pytest.raises(UserError, match="is not a folder"):
        dataset(tmp_path / "absent")


def test_images_without_captions_jsonl_point_to_prepare_data(tmp_path):
    save_image(str(tmp_path / "dogs" / "rex.jpg"))
    with pytest.raises(UserError, match=r"holds images but no captions.jsonl .*python prepare_data.py --data .* --concept WORD"):
        dataset(tmp_path)


def test_a_captions_line_for_a_missing_image_is_one_sentence_naming_it(tmp_path):
    make_image_folder(str(tmp_path))
    before = (tmp_path / "captions.jsonl").read_text()
    append_line(tmp_path / "captions.jsonl", json.dumps({"image": "park/gone.jpg", "captions": DOG_CAPTIONS, "concept": "dog"}))
    with pytest.raises(UserError, match=r"captions.jsonl has a line for park/gone, which is not an image in "):
        dataset(tmp_path)
    assert (tmp_path / "captions.jsonl").read_text().startswith(before)  # nothing the user wrote is touched
    # the same for CelebA's flat folders
    make_celeba(tmp_path / "celeba", n=2)
    with open(tmp_path / "celeba" / "captions.jsonl", "w") as f:
        f.write(json.dumps({"image": "000009.jpg", "captions": ["a man", "the man"], "concept": "man"}) + "\n")
    with pytest.raises(UserError, match=r"has a line for 000009, which is not an image"):
        dataset(tmp_path / "celeba")


def test_a_mask_of_the_wrong_size_is_one_sentence_naming_both_sizes(tmp_path):
    make_image_folder(str(tmp_path))
    Image.fromarray(np.zeros((32, 48), np.uint8)).save(tmp_path / "masks" / "park" / "bella.png")
    with pytest.raises(UserError, match=r"mask .*masks/park/bella.png is 48x32 but its image .*park/bella.png is 96x64; "):
        dataset(tmp_path)


def test_a_truncated_webp_is_counted_unreadable(tmp_path):
    make_image_folder(str(tmp_path))
    truncate(tmp_path / "park" / "deep" / "max.webp")
    ds = dataset(tmp_path)
    assert len(ds) == 2 and ds.summary.endswith("skipped 1 of 3 images: 1 unreadable")


def test_an_image_folder_whose_masks_are_not_laid_out_like_its_images_says_where_masks_go(tmp_path):
    """A user's folder: images in sub-folders, masks/ flat (masks/pet00.png for indoor/pet00.jpg).
    The error names the first image without a mask, the path its mask was looked for at, the
    layout masks/ must mirror, and the mask of its name found elsewhere."""
    make_image_folder(str(tmp_path), names=("indoor/pet00.jpg", "indoor/pet01.jpg", "outdoor/pet02.jpg"))
    for name in ("pet00", "pet01"):
        os.replace(tmp_path / "masks" / "indoor" / f"{name}.png", tmp_path / "masks" / f"{name}.png")
    where = os.path.join(str(tmp_path), "masks", "indoor", "pet00.png")
    ds = dataset(tmp_path)  # outdoor/pet02.jpg still has its mask: the summary says why two were skipped
    assert [item[0] for item in ds.items] == ["outdoor/pet02.jpg"]
    assert ds.summary.endswith(f"skipped 2 of 3 images: 2 without annotations (the first without a mask, "
                               f"indoor/pet00.jpg, has none at {where}: masks/ must mirror the image folder, each "
                               f"mask at its image's path and name with .png; masks/pet00.png is there, at another path)")
    os.replace(tmp_path / "masks" / "outdoor" / "pet02.png", tmp_path / "masks" / "pet02.png")
    with pytest.raises(UserError, match=re.escape(f"3 without annotations (the first without a mask, indoor/pet00.jpg, "
                                                  f"has none at {where}: masks/ must mirror the image folder")):
        dataset(tmp_path)
