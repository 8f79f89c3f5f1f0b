"""Captions and subject masks for any image folder, made the way the paper made them.

CoCoIns trains on images with two captions each and a mask of the subject (paper section 4:
"We generate prompts with the captioning model LLaVA-Next and masks with the zero-shot
referring segmentation model Grounded SAM 2"). This command makes both for a folder of images
(or a CelebA folder), in the format data.py reads:

    python prepare_data.py --data FOLDER --concept dog       # every image shows a dog
    python prepare_data.py --data celeba/ --concept auto     # man / woman / boy / girl / person per image
    torchrun --nproc_per_node=8 prepare_data.py --data FOLDER --concept dog

- `captions.jsonl`: one line per image, `{"image": "park/rex.jpg", "captions": [P1, P2], "concept": "dog"}`.
  Two captions from an image-text-to-text model (`--captioner`, LLaVA-Next by default), each
  naming the concept word exactly once as a whole word: the mapper's pseudo-word is inserted
  before that one word (model/mapper.py). A caption that does not is re-asked once with a
  prompt that demands the word; an image still without two such captions is skipped.
- `masks/park/rex.png`: the image's size, 255 on what the concept word refers to. Grounded SAM:
  Grounding DINO (`--detector`) finds boxes for the text "dog.", SAM (`--segmenter`) turns the
  best box into a mask. An image where nothing is found is skipped.

Runs are resumable: an image is done when it has its line and its mask, so a rerun does no
work and a killed run continues. Lines go to per-process files under `.prepare_data/` first
(appended, flushed each batch) and are merged into captions.jsonl at the end by one atomic
rename; masks are written to a temporary file and renamed. Skipped images are recorded there
too and not tried again (delete `.prepare_data/skipped.*.jsonl` to retry them). Under torchrun
each process takes every N-th image.

Read next: data.py (how these files become training items).
"""

import argparse
import glob
import json
import os
import sys
import uuid

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

import cli
import data
import folders
from model.errors import UserError

# The paper's models, as transformers ships them: LLaVA-Next (Liu et al. 2024) for captions;
# Grounded SAM (Ren et al. 2024) is Grounding DINO's boxes refined into masks by SAM. The paper
# used SAM 2; its transformers processor needs torchvision, so the default is SAM, the one our
# tests run, and `--segmenter facebook/sam2.1-hiera-large` takes SAM 2 where torchvision is installed.
DEFAULT_CAPTIONER = "llava-hf/llava-v1.6-mistral-7b-hf"
DEFAULT_DETECTOR = "IDEA-Research/grounding-dino-base"
DEFAULT_SEGMENTER = "facebook/sam-vit-huge"

# What the captioner is asked. Two different questions give two different descriptions of one
# image (the paper's P1 and P2); both name the concept so the caption uses the word itself.
PROMPTS = {
    "auto": "Describe the main person in this image in one sentence, calling them a man, woman, boy, girl or person.",
    "describe": "In one sentence, describe the {concept} in this image.",
    "caption": "Mentioning the {concept}, write a short caption for this photo.",
    "retry": 'Describe this image in one sentence that uses the word "{concept}" exactly once.',
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", required=True, help="folder of images (subfolders too), or a CelebA folder")
    p.add_argument("--concept", required=True, help="the word every caption names and every mask covers (dog, "
                   "teddy bear), or auto: man, woman, boy, girl or person per image")
    p.add_argument("--captioner", default=DEFAULT_CAPTIONER, help="image-text-to-text model: hub id (found in the "
                   "HF cache) or local folder")
    p.add_argument("--detector", default=DEFAULT_DETECTOR, help="zero-shot object detector (Grounding DINO): hub id or folder")
    p.add_argument("--segmenter", default=DEFAULT_SEGMENTER, help="box-prompted segmenter (SAM, SAM 2): hub id or folder")
    p.add_argument("--batch-size", type=int, default=8, help="images per model call and per process")
    # Grounding DINO's own demo threshold: below it, boxes for a named object are mostly wrong.
    p.add_argument("--box-threshold", type=float, default=0.35, help="lowest detector score for a box of the concept")
    # A CLIP prompt holds 75 words' tokens; a one-sentence description needs far fewer.
    p.add_argument("--max-new-tokens", type=int, default=60, help="longest caption, in captioner tokens")
    p.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda, cuda:N")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# The concept-word rules


def caption_names_concept(caption: str, concept: str, earlier=()) -> bool:
    """A usable caption names the concept exactly once, as a whole word, and differs from the
    image's earlier captions (a pair of equal captions would make the positive the anchor)."""
    return data.count_concept(caption, concept) == 1 and caption.lower() not in {c.lower() for c in earlier}


def choose_concept(caption: str, male: bool | None) -> str:
    """--concept auto for one image: boy or girl when the caption says so (CelebA's attributes
    cannot); otherwise CelebA's Male attribute where there is one (labelled by people, surer
    than a captioner's guess); otherwise the caption's man, woman or person; otherwise person."""
    named = [w for w in data.PEOPLE if data.count_concept(caption, w)]  # --concept auto chooses among these
    for word in ("boy", "girl"):
        if word in named:
            return word
    if male is not None:
        return "man" if male else "woman"
    return named[0] if named else "person"


def clean(text: str) -> str:
    """One line of caption: whitespace collapsed, stray quotes around it removed."""
    return " ".join(text.split()).strip("\"' ")


# ----------------------------------------------------------------------------------------------
# Models: checked by their configs before any weights load, then loaded


def check_model(name: str, flag: str, kind: str, model_types, example: str):
    """The model's config (a local folder, the HF cache, or the hub) must be of the right kind."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise UserError(f"{flag} {name} is neither a model folder nor a model in the HF cache ({e.__class__.__name__}); "
                        f"download it with `hf download {name}` or pass a local folder") from None
    if config.model_type not in model_types:
        raise UserError(f"{flag} {name} is a {config.model_type} model, not {kind} (e.g. {example})")


def check_models(args):
    from transformers.models.auto import modeling_auto as auto

    check_model(args.captioner, "--captioner", "an image-text-to-text model",
                auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES, DEFAULT_CAPTIONER)
    check_model(args.detector, "--detector", "a zero-shot object detector",
                auto.MODEL_FOR_ZERO_SHOT_OBJECT_DETECTION_MAPPING_NAMES, DEFAULT_DETECTOR)
    check_model(args.segmenter, "--segmenter", "a box-prompted segmenter",
                auto.MODEL_FOR_MASK_GENERATION_MAPPING_NAMES, DEFAULT_SEGMENTER)


class Models:
    """The three models and their processors on one device."""

    def __init__(self, args, device: torch.device):
        from transformers import (AutoModelForImageTextToText, AutoModelForMaskGeneration,
                                  AutoModelForZeroShotObjectDetection, AutoProcessor)

        self.device = device
        # The 7 B captioner in bfloat16 on GPUs (half the memory, the precision it was trained
        # in); the detector and segmenter are small and their box and mask thresholds are
        # calibrated in float32, so they stay there.
        self.dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.captioner = AutoModelForImageTextToText.from_pretrained(args.captioner, dtype=self.dtype).to(device).eval()
        self.caption_processor = AutoProcessor.from_pretrained(args.captioner)
        tokenizer = self.caption_processor.tokenizer
        tokenizer.padding_side = "left"  # a batch's prompts must end where generation starts
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.detector = AutoModelForZeroShotObjectDetection.from_pretrained(args.detector).to(device).eval()
        self.detect_processor = AutoProcessor.from_pretrained(args.detector)
        self.segmenter = AutoModelForMaskGeneration.from_pretrained(args.segmenter).to(device).eval()
        self.segment_processor = AutoProcessor.from_pretrained(args.segmenter)
        self.max_new_tokens = args.max_new_tokens
        self.box_threshold = args.box_threshold

    @torch.no_grad()
    def caption(self, images: list[Image.Image], prompts: list[str]) -> list[str]:
        """One greedy answer per (image, prompt) pair, in one batched generate call."""
        p = self.caption_processor
        texts = [p.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
                                       add_generation_prompt=True) for q in prompts]
        inputs = p(images=images, text=texts, padding=True, return_tensors="pt").to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        # Greedy: the same image gives the same captions, so a resumed run equals an uninterrupted one.
        out = self.captioner.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        return [clean(t) for t in p.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)]

    @torch.no_grad()
    def masks(self, images: list[Image.Image], concepts: list[str]) -> list[np.ndarray | None]:
        """Grounded SAM: the best detector box for each image's concept, then SAM's mask of that
        box at the image's size (bool H x W); None where no box reaches --box-threshold."""
        boxes = [None] * len(images)
        # One detector call per image size and concept: padding a batch to its largest image
        # would change the backbone's windows, so an image's boxes would depend on its batch
        # (CelebA's images all share one size, so it still runs in whole batches).
        groups = {}
        for k, (im, concept) in enumerate(zip(images, concepts)):
            groups.setdefault((im.size, concept), []).append(k)
        for ((w, h), concept), ks in groups.items():
            # Grounding DINO reads lower-case phrases ended by a period.
            inputs = self.detect_processor(images=[images[k] for k in ks], text=[concept.lower() + "."] * len(ks),
                                           return_tensors="pt").to(self.device)
            found = self.detect_processor.post_process_grounded_object_detection(
                self.detector(**inputs), inputs["input_ids"], threshold=self.box_threshold, text_threshold=0.0,
                target_sizes=[(h, w)] * len(ks))
            # The best box only: a caption names one subject, and a second person or dog in the
            # background must not become part of it.
            for k, r in zip(ks, found):
                boxes[k] = r["boxes"][r["scores"].argmax()].tolist() if len(r["scores"]) else None
        hits = [k for k, box in enumerate(boxes) if box is not None]
        results = [None] * len(images)
        if not hits:
            return results
        inputs = self.segment_processor(images=[images[k] for k in hits], input_boxes=[[boxes[k]] for k in hits],
                                        return_tensors="pt").to(self.device)
        out = self.segmenter(pixel_values=inputs["pixel_values"], input_boxes=inputs["input_boxes"], multimask_output=False)
        # SAM's processor also wants the resized input sizes; SAM 2's knows them.
        sizes = [inputs[k] for k in ("original_sizes", "reshaped_input_sizes") if k in inputs]
        for k, mask in zip(hits, self.segment_processor.post_process_masks(out.pred_masks.cpu(), *[s.cpu() for s in sizes])):
            mask = mask[0, 0].numpy().astype(bool)
            results[k] = mask if mask.any() else None
        return results


# ----------------------------------------------------------------------------------------------
# One batch of images: captions, then masks


def captions_for(models: Models, images, concepts):
    """Two captions per image naming its concept once (None where even the re-asked ones fail)."""
    asked = [(k, "describe") for k in range(len(images))] + [(k, "caption") for k in range(len(images))]
    answers = models.caption([images[k] for k, _ in asked], [PROMPTS[q].format(concept=concepts[k]) for k, q in asked])
    captions = [[] for _ in images]
    retry = []
    for (k, _), answer in zip(asked, answers):
        if caption_names_concept(answer, concepts[k], captions[k]):
            captions[k].append(answer)
        else:
            retry.append(k)
    if retry:
        # Re-asked once, with a prompt that demands the word.
        answers = models.caption([images[k] for k in retry], [PROMPTS["retry"].format(concept=concepts[k]) for k in retry])
        for k, answer in zip(retry, answers):
            if caption_names_concept(answer, concepts[k], captions[k]):
                captions[k].append(answer)
    return [c if len(c) == 2 else None for c in captions]


# ----------------------------------------------------------------------------------------------
# Files: what is done, what to do, atomic writes


class Folder:
    """The image folder and this command's files in it (see the module docstring)."""

    def __init__(self, root: str):
        layout = self.layout = folders.find_layout(root, need_captions=False)
        self.images_dir, self.nested = layout.images, layout.nested
        self.files = folders.scan_images(layout.images, nested=layout.nested)  # {name: relative path}
        if not self.files:
            raise UserError(f"no images (jpg, jpeg, png, webp) in {layout.images}")
        self.captions_path = layout.captions or os.path.join(layout.root, "captions.jsonl")
        self.masks_dir = layout.masks or os.path.join(layout.root, "masks")
        self.work = os.path.join(layout.root, ".prepare_data")
        self.male = {}  # CelebA's Male attribute by image, for --concept auto
        if layout.attributes:
            names, index, table, _ = folders.read_table(layout.attributes, np.int8)
            if names and "Male" in names:
                column = names.index("Male")
                self.male = {stem: bool(table[row, column] > 0) for stem, row in index.items()}

    def check_lines(self):
        """A captions.jsonl line for an image that is not there: the mistake data.py refuses, said
        now, before any model loads, rather than after hours of captioning."""
        if self.layout.captions:
            names = self.read_lines(self.captions_path, "concept").keys()
            folders.check_captions_name_existing_images(self.layout, names, self.files)

    def name(self, image: str) -> str:
        return folders.relative_stem(image) if self.nested else folders.file_stem(image)

    def mask_path(self, name: str) -> str:
        return os.path.join(self.masks_dir, name + ".png")

    def read_lines(self, path: str, field: str) -> dict:
        """{name: line} of a jsonl file's complete lines that name an image and hold `field`."""
        lines = {}
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                for line in f:
                    try:
                        entry = json.loads(line)
                        if isinstance(entry[field], str):
                            lines[self.name(entry["image"])] = line.rstrip("\n")
                    except (ValueError, KeyError, TypeError, AttributeError):
                        continue  # the half-written last line of a killed run, or a user's broken line
        return lines

    def parts(self, kind: str) -> list[str]:
        return sorted(glob.glob(os.path.join(self.work, f"{kind}.rank*.jsonl")))

    def state(self):
        """(names with a caption line, names skipped earlier with why)."""
        lines = self.read_lines(self.captions_path, "concept")
        for part in self.parts("captions"):
            lines.update(self.read_lines(part, "concept"))
        skipped = {}
        for part in self.parts("skipped"):
            skipped.update({name: json.loads(line)["why"] for name, line in self.read_lines(part, "why").items()})
        return lines, skipped

    def write_mask(self, name: str, mask: np.ndarray):
        path = self.mask_path(name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{uuid.uuid4().hex}.tmp"  # not an image name: data.py never reads a half-written mask
        Image.fromarray(mask.astype(np.uint8) * 255).save(tmp, format="PNG")
        os.replace(tmp, path)

    def merge(self):
        """Fold the per-process caption files into captions.jsonl with one atomic rename: the
        file's text stays as it was, byte for byte, and new lines follow in name order."""
        parts = self.parts("captions")
        new = {}
        for part in parts:
            new.update(self.read_lines(part, "concept"))
        kept = self.read_lines(self.captions_path, "concept")
        added = sorted(new.keys() - kept.keys())
        if added:
            text = ""
            if os.path.exists(self.captions_path):
                with open(self.captions_path, encoding="utf-8") as f:
                    text = f.read()
            if text and not text.endswith("\n"):
                text += "\n"
            text += "".join(new[name] + "\n" for name in added)
            tmp = f"{self.captions_path}.{uuid.uuid4().hex}.tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.captions_path)
        for part in parts:
            os.remove(part)


class Appender:
    """A per-process jsonl file under .prepare_data/, appended and flushed to disk per batch."""

    def __init__(self, path: str):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        # A killed run may have left half a line: cut it, or the next line would be glued to it.
        if os.path.exists(path):
            with open(path, "rb+") as f:
                content = f.read()
                f.truncate(content.rfind(b"\n") + 1)
        self.file = open(path, "a", encoding="utf-8")

    def write(self, lines: list[dict]):
        self.file.writelines(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self):
        self.file.close()


# ----------------------------------------------------------------------------------------------
# The command


def pick_device(name: str) -> torch.device:
    """--device: auto is CUDA where there is a GPU, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for CUDA but this PyTorch sees no CUDA GPU; use --device cpu")
    return device


def main(argv=None):
    args = parse_args(argv)
    if args.batch_size < 1 or args.max_new_tokens < 1:
        raise UserError("--batch-size and --max-new-tokens must be positive")
    concept = " ".join(args.concept.split())
    if not concept:
        raise UserError("--concept is empty; name what the images show (dog, teddy bear) or pass auto")
    folder = Folder(args.data)
    folder.check_lines()
    with cli.torchrun_processes(pick_device(args.device)) as (device, rank, world):
        run(args, folder, concept, device, rank, world)


def run(args, folder: Folder, concept: str, device, rank: int, world: int):
    lines, skipped = folder.state()
    masked = {name for name in folder.files if os.path.exists(folder.mask_path(name))}
    ready_before = len(lines.keys() & masked)
    todo = sorted(name for name in folder.files if name not in skipped and not (name in lines and name in masked))
    mine = todo[rank::world]
    if todo:
        check_models(args)  # a wrong --captioner must not cost minutes of loading the others first
    if world > 1:
        dist.barrier()  # every process has read the state before anyone appends to it
    if mine:
        process(args, folder, concept, mine, lines, masked, device, rank)
    if world > 1:
        dist.barrier()
    if rank == 0:
        folder.merge()
        lines, skipped = folder.state()
        ready = {name for name in lines if os.path.exists(folder.mask_path(name))}
        reasons = {}
        for why in skipped.values():
            reasons[why] = reasons.get(why, 0) + 1
        why = ", ".join(f"{n} {w}" for w, n in sorted(reasons.items()))
        print(f"prepare_data: {len(ready)} of {len(folder.files)} images have captions and masks in "
              f"{folder.captions_path} and {folder.masks_dir} ({len(ready) - ready_before} made now); "
              + (f"skipped {len(skipped)}: {why} (delete {folder.work}/skipped.*.jsonl to try them again)"
                 if skipped else "nothing skipped"))


def process(args, folder: Folder, concept: str, names: list[str], lines: dict, masked: set, device, rank: int):
    models = Models(args, device)
    captions_out = Appender(os.path.join(folder.work, f"captions.rank{rank}.jsonl"))
    skipped_out = Appender(os.path.join(folder.work, f"skipped.rank{rank}.jsonl"))
    progress = tqdm(total=len(names), disable=rank != 0, dynamic_ncols=True, desc="prepare_data")
    try:
        for start in range(0, len(names), args.batch_size):
            batch, images, skips = [], [], []
            for name in names[start : start + args.batch_size]:
                try:
                    with Image.open(os.path.join(folder.images_dir, folder.files[name])) as im:
                        images.append(im.convert("RGB"))
                    batch.append(name)
                except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
                    skips.append({"image": folder.files[name], "why": "unreadable"})
            new_lines, skips = prepare_batch(models, folder, concept, batch, images, lines, masked, skips)
            # Masks are on disk before their lines: a line always means a finished image.
            captions_out.write(new_lines)
            skipped_out.write(skips)
            progress.update(len(batch) + sum(s["why"] == "unreadable" for s in skips))
    finally:
        progress.close()
        captions_out.close()
        skipped_out.close()


def prepare_batch(models: Models, folder: Folder, concept: str, batch, images, lines, masked, skips):
    """Captions where an image has no line yet, masks where it has none; -> (new lines, skips)."""
    concepts = {}
    for name in batch:
        if name in lines:
            concepts[name] = json.loads(lines[name])["concept"]  # a line already written is kept as it is
    need_captions = [k for k, name in enumerate(batch) if name not in lines]
    if concept == "auto" and need_captions:
        answers = models.caption([images[k] for k in need_captions], [PROMPTS["auto"]] * len(need_captions))
        for k, answer in zip(need_captions, answers):
            concepts[batch[k]] = choose_concept(answer, folder.male.get(batch[k]))
    elif concept != "auto":
        concepts.update({batch[k]: concept for k in need_captions})
    captions = {}
    if need_captions:
        made = captions_for(models, [images[k] for k in need_captions], [concepts[batch[k]] for k in need_captions])
        for k, pair in zip(need_captions, made):
            if pair is None:
                skips.append({"image": folder.files[batch[k]], "why": "without two captions naming the concept once"})
            else:
                captions[batch[k]] = pair
    need_masks = [k for k, name in enumerate(batch) if name not in masked and (name in lines or name in captions)]
    if need_masks:
        found = models.masks([images[k] for k in need_masks], [concepts[batch[k]] for k in need_masks])
        for k, mask in zip(need_masks, found):
            if mask is None:
                captions.pop(batch[k], None)
                skips.append({"image": folder.files[batch[k]], "why": "nothing found"})
            else:
                folder.write_mask(batch[k], mask)
    new_lines = [{"image": folder.files[name], "captions": pair, "concept": concepts[name]}
                 for name, pair in captions.items()]
    return new_lines, skips


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        sys.exit(f"error: {e}")
