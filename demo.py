"""A web page for CoCoIns: codes in rows, prompts in columns, one labelled grid.

    pip install -r requirements-demo.txt
    python demo.py --mapper runs/cocoins          # then open http://127.0.0.1:7860

The page takes codes ("0, 3, 7", or a range "0-7") and prompts (one per line), a seed, steps and
guidance, and draws a grid: a row per code, a column per prompt. Cell (code C, prompt P) is the
very image `python sample.py --code C --prompt P --seed S --steps N --guidance G` draws (with this
page's --width, --height, --weights, --mapper and --dtype): every cell uses the one seed, so
down a column only the code changes, and along a row only the prompt.

The model loads once, at start-up. Every mistake on the page is one sentence, shown before
anything is drawn; the page runs offline (no analytics, no share link). Like sample.py, it only
checks what it is given and calls model/sdxl.py and model/mapper.py, through sample.py's helpers.
"""

import argparse
import itertools
import os
import re
import sys
import tempfile

from cli import DTYPE_HELP, DTYPES, HelpFormatter, grid_info, labelled_grid, pick_device, pick_dtype
from model import ddim, mapper
from model.errors import UserError
from sample import DEFAULT_CONCEPTS, DEFAULT_MAPPER, mapper_file, seeds_from, subject_concepts, subjects_from_codes

# Each image costs a whole generation (about 1.5 s for SDXL on an H200, minutes on a CPU), and 24
# SDXL images make a sheet of up to 24 megapixels: enough to compare codes, small enough to wait for.
MAX_IMAGES = 24
# What the page shows first: two codes of one person word in two scenes.
EXAMPLE_CODES = "0, 1"
EXAMPLE_PROMPTS = "a photo of a woman on a beach\na photo of a woman in a forest"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--weights", default=None, help="SDXL single .safetensors file or diffusers folder (default: "
                                                   "weights/sd_xl_base_1.0.safetensors, else the Hugging Face cache)")
    p.add_argument("--mapper", default=None, help="trained CoCoIns mapper: the file, or a train.py run folder "
                                                  "(default: weights/mapper.safetensors in this project)")
    p.add_argument("--concept", default=None, help="the concept word every code instantiates (default: the first of "
                                                   "%s the first prompt names)" % "/".join(DEFAULT_CONCEPTS))
    p.add_argument("--width", type=int, default=1024, help="image width in pixels, a multiple of 8")
    p.add_argument("--height", type=int, default=1024, help="image height in pixels, a multiple of 8")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", default="auto", choices=DTYPES, help=DTYPE_HELP)
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every network interface)")
    p.add_argument("--port", type=int, default=7860, help="port to serve on")
    args = p.parse_args(argv)
    args.mapper = args.mapper or DEFAULT_MAPPER
    return args


# ----------------------------------------------------------------------------------------------
# 1. Reading the page's fields: one sentence for each mistake
# ----------------------------------------------------------------------------------------------

def parse_codes(text: str, prompts: int) -> list[int]:
    """ "0, 3, 7", "0-7" or both ("0-3, 9") -> [0, 3, 7] ...: whole numbers from 0, each once,
    at most MAX_IMAGES images with `prompts` prompts (counted before a range is spelled out)."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise UserError("enter at least one code, e.g. 0, 3, 7 or a range 0-7")
    ranges = []
    for item in items:
        match = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", item)
        if not match:
            raise UserError(f"{item!r} is neither a code nor a range: codes are whole numbers from 0, "
                            f"written 0, 3, 7 or as a range 0-7")
        first, last = int(match[1]), int(match[2] or match[1])
        if last < first:
            raise UserError(f"code range {item} is empty: write the smaller code first ({last}-{first})")
        ranges.append((first, last))
    images = sum(last - first + 1 for first, last in ranges) * prompts
    if images > MAX_IMAGES:
        raise UserError(f"{text.strip()} with {prompts} prompt(s) makes {images} images, and the page draws at most "
                        f"{MAX_IMAGES} at a time; ask for fewer codes or prompts")
    codes = [code for first, last in ranges for code in range(first, last + 1)]
    for code in codes:
        mapper.code_to_z(code, 1)  # the code's range (0 to 2**63 - 1), in one sentence
        if codes.count(code) > 1:
            raise UserError(f"code {code} is listed twice; list each code once")
    return codes


def parse_prompts(text: str) -> list[str]:
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UserError("enter at least one prompt, one per line, each naming the concept word (e.g. a woman)")
    return prompts


def check_inputs(codes_text, prompts_text, seed, steps, guidance, concept):
    """The page's fields -> (codes, prompts, concept), or a UserError; nothing has been drawn yet."""
    for name, value in (("seed", seed), ("steps", steps), ("guidance", guidance)):
        if value is None:  # an emptied number field
            raise UserError(f"enter a number for the {name}")
    prompts = parse_prompts(prompts_text)
    codes = parse_codes(codes_text, len(prompts))
    seeds_from(argparse.Namespace(seed=[seed], num_images=None))  # the seed's range, as sample.py says it
    if not 1 <= steps <= ddim.T - ddim.STEPS_OFFSET:
        raise UserError(f"{steps} steps: use at least 1 step and at most {ddim.T - ddim.STEPS_OFFSET}")
    # Every prompt names the concept, with room for the pseudo-word: sample.py's own checks, on the
    # first code (the concept is the same for every row).
    concepts = subject_concepts(argparse.Namespace(code=codes[:1], concept=[concept] if concept else []), prompts)
    return codes, prompts, concepts[0]


# ----------------------------------------------------------------------------------------------
# 2. Drawing: the one place the page calls the pipeline
# ----------------------------------------------------------------------------------------------

def draw_grid(model, f, dtype, codes, concept, prompts, seed, steps, guidance, width, height, progress):
    """The grid's images, row by row: cell (code, prompt) is `sample.py --code code --prompt prompt
    --seed seed` (no negative prompt, η = 0: sample.py's defaults). `progress.tqdm` (Gradio's) counts
    the images; the sampler's own progress bar counts the steps of each."""
    images = []
    for code, prompt in progress.tqdm([(code, prompt) for code in codes for prompt in prompts], desc="images",
                                      unit="images"):
        subjects = subjects_from_codes([code], [concept], f, model, dtype)
        images.append(model.generate(prompt, seed, "", steps, guidance, 0.0, width, height, subjects, progress=True))
    return images


# ----------------------------------------------------------------------------------------------
# 3. The page
# ----------------------------------------------------------------------------------------------

def build_page(model, f, dtype, args, gr):
    """The Gradio page: the fields, the Generate button and the grid, wired to check_inputs and draw_grid."""
    sheets = tempfile.TemporaryDirectory(prefix="cocoins-demo-")  # the grids' PNGs, removed at exit
    numbers = itertools.count()

    def generate(codes_text, prompts_text, seed, steps, guidance, progress=gr.Progress(track_tqdm=True)):
        try:
            codes, prompts, concept = check_inputs(codes_text, prompts_text, seed, steps, guidance, args.concept)
        except UserError as e:
            raise gr.Error(str(e), print_exception=False) from None
        images = draw_grid(model, f, dtype, codes, concept, prompts, int(seed), int(steps), float(guidance),
                           args.width, args.height, progress)
        title = f"rows are codes ({concept}), columns are prompts; seed {seed}, {steps} steps, guidance {guidance}"
        sheet = labelled_grid(images, [f"code {c}" for c in codes], prompts, title)
        # A PNG file, not an image object: the page shows and downloads exactly these bytes, labels
        # whole in their PNG text, as sample.py's contact sheet.
        path = os.path.join(sheets.name, f"grid-{next(numbers)}.png")
        sheet.save(path, pnginfo=grid_info("code", codes, "prompt", prompts, concept=concept, seed=seed, steps=steps,
                                           guidance=guidance, width=args.width, height=args.height))
        # the labels in full (the sheet cuts them to an image's width)
        legend = "Columns, left to right: " + "; ".join(f"({k + 1}) {p}" for k, p in enumerate(prompts))
        return path, legend

    with gr.Blocks(title="CoCoIns", analytics_enabled=False) as page:
        gr.Markdown("# CoCoIns: one code, one subject, in every prompt\n"
                    "Each row is a code, each column a prompt. Cell (code C, prompt P) is the image "
                    "`python sample.py --code C --prompt P --seed S --steps N --guidance G` draws "
                    f"({args.width} x {args.height} px). "
                    f"Every prompt must name the concept word; at most {MAX_IMAGES} images at a time.")
        with gr.Row():
            codes = gr.Textbox(EXAMPLE_CODES, label="codes (0, 3, 7 or a range 0-7)", elem_id="codes")
            prompts = gr.Textbox(EXAMPLE_PROMPTS, label="prompts, one per line", lines=3, elem_id="prompts")
        with gr.Row():
            seed = gr.Number(0, label="seed", precision=0, elem_id="seed")
            steps = gr.Number(30, label="steps", precision=0, elem_id="steps")
            guidance = gr.Number(5.0, label="guidance", elem_id="guidance")
        button = gr.Button("Generate", variant="primary", elem_id="generate")
        grid = gr.Image(label="grid", type="filepath", format="png", interactive=False, elem_id="grid")
        legend = gr.Markdown(elem_id="legend")
        button.click(generate, [codes, prompts, seed, steps, guidance], [grid, legend], concurrency_limit=1)
    return page


def main(argv=None):
    args = parse_args(argv)
    from model import speed
    from model.checkpoint import MISSING_WEIGHTS, find_default_weights, load_mapper
    from model.sdxl import SDXL, check_size

    # Check what can be checked before spending a minute loading 7 GB.
    check_size(args.width, args.height)
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    weights = args.weights or find_default_weights()
    if weights is None:
        raise UserError(MISSING_WEIGHTS)
    f = load_mapper(mapper_file(args.mapper))  # a few MB
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before gradio is imported: it never phones home
    try:
        import gradio as gr
    except ImportError:
        raise UserError("the demo needs Gradio: pip install -r requirements-demo.txt") from None

    print(f"loading SDXL from {weights} on {device} ({str(dtype).replace('torch.', '')})", file=sys.stderr)
    model = SDXL.load(weights, device=device, dtype=dtype)
    speed.save_memory(model.unet, model.vae)  # as sample.py: the same numbers, less memory
    page = build_page(model, f, dtype, args, gr)
    # (small images, such as 64-pixel ones, are shown at least 384 pixels high)
    page.queue().launch(server_name=args.host, server_port=args.port, share=False,
                        css="#grid img { min-height: 384px; object-fit: contain; }")


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        sys.exit(f"error: {e}")
