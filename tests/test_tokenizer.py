"""The CLIP tokenizer (model/clip.py) against the tokenizer SDXL was trained with.

Reference: open_clip's `tokenizer.py` (its copy of OpenAI's CLIP tokenizer; sgm tokenizes bigG
with it). Importing the `open_clip` package would pull torchvision, so the module is loaded by
file path. transformers' CLIPTokenizer (what diffusers uses) is compared too, with its known
divergences pinned; it reads vocab.json/merges.txt that the tests write from open_clip's
vocabulary and weights/ (no network).
"""

import gzip
import hashlib
import importlib.util
import json
import os

import ftfy
import pytest
import torch

from model.checkpoint import tokenizer_from_diffusers
from model.errors import UserError
from model.clip import BOS_ID, BUNDLED_VOCAB, CONTEXT_LENGTH, EOS_ID, NUM_MERGES, Tokenizer, clean_text, eos_positions

LONG = "a highly detailed portrait of a smiling old fisherman with a grey beard, " * 12

# Prompts where our tokenizer and open_clip's (ftfy included) must give identical ids.
PROMPTS = [
    "",
    "a woman reading",
    "A photo of a [w] woman reading a book in a cafe",
    "a photo of a cat!!!",
    "wow!",
    "!!!",
    "hello , world ; what's up ?",
    "it's a man's world, isn't it? they're here, we've gone, I'm sure, you'll see, he'd go",
    "IT'S LOUD AND CLEAR",
    "the year 1999 and 2024, 3.14159 and 10,000,000 dollars",
    "room 101b, model x-42z",
    "café, naïve, jalapeño, Zürich, smörgåsbord, São Paulo",
    "Ærø and Øresund, Łódź, İstanbul",
    "a dog 🐶 and a cat 🐱 on a 🚀 to the 🌕",
    "👩‍🚀 astronaut emoji with a zero width joiner",
    "🇯🇵 flag emoji",
    "東京の夜景、ネオンサイン",
    "一只猫坐在窗台上",
    "서울의 밤거리",
    "Москва зимой, красная площадь",
    "Αθήνα, ο Παρθενώνας",
    "مدينة في الليل",
    "a    lot     of     spaces",
    "  leading and trailing spaces   ",
    "tabs\tand\nnewlines\r\nand\u00a0non-breaking\u2003em spaces",
    "fish &amp; chips",
    "fish &amp;amp; chips",
    "5 &lt; 6 &gt; 4 &quot;quoted&quot; &#39;single&#39; &#x263A;",
    "tom &amp chips without semicolon",
    "html <b>bold</b> tags <br/> stay",
    "a woman’s hat and “curly” ‘quotes’",
    "cafe\u0301 with a combining accent",
    "snake_case_words and kebab-case-words",
    "email@example.com and https://example.com/path?q=1&x=2",
    "#hashtag @mention $100 50% ^caret* (parens) [brackets] {braces} <angles>",
    "...ellipsis... --dashes-- ~~tilde~~ ``backticks``",
    "trending on artstation, 8k, unreal engine, octane render, hdr, (masterpiece:1.2)",
    "a b c d e f g h i j k l m n o p q r s t u v w x y z",
    "0123456789",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    LONG,
    " ".join(f"word{i}" for i in range(200)),
    "!" * 100,
]

# Where we differ from open_clip because we do not run ftfy (model/clip.py, clean_text):
# for each, open_clip's ids are exactly ours for the ftfy-repaired text.
FTFY_DIVERGENCES = [
    "cafÃ© au lait",  # mojibake (UTF-8 read as Latin-1): ftfy repairs it to "café"
    "ＡＢＣ full width letters",  # ftfy narrows full-width forms to ASCII
    "ﬁsh and ﬂowers",  # ftfy expands Latin ligatures
    "fish &amp;amp;amp; chips",  # ftfy decodes HTML once more before CLIP's two rounds
]

# transformers' CLIPTokenizer skips CLIP's cleaning: HTML entities stay literal, and quotes stay curly.
HF_CLEANING_DIVERGENCES = {"&", "’", "“", "‘"}


def _load_open_clip_tokenizer():
    spec = importlib.util.find_spec("open_clip")
    assert spec is not None, "open_clip_torch is a test dependency (pip install --no-deps open_clip_torch)"
    path = os.path.join(os.path.dirname(spec.origin), "tokenizer.py")
    module_spec = importlib.util.spec_from_file_location("open_clip_tokenizer", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.SimpleTokenizer()


@pytest.fixture(scope="module")
def open_clip_tok():
    return _load_open_clip_tokenizer()


@pytest.fixture(scope="module")
def tok_l():
    return Tokenizer.bundled("eos")


@pytest.fixture(scope="module")
def tok_g():
    return Tokenizer.bundled("!")


def _eos_padded(ids):
    """open_clip's ids (zero-padded) with everything after the first EOS set to EOS: CLIP-L's convention."""
    ids = ids.clone()
    after = torch.arange(ids.shape[1]) > eos_positions(ids)[:, None]
    ids[after] = EOS_ID
    return ids


def _write_diffusers_folder(folder, vocab, pad_entry, file="special_tokens_map.json"):
    """vocab.json + merges.txt as a diffusers tokenizer folder holds them."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with gzip.open(BUNDLED_VOCAB, "rt", encoding="utf-8") as f:
        merges = f.read().split("\n")[1 : NUM_MERGES + 1]
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    with open(os.path.join(folder, file), "w", encoding="utf-8") as f:
        json.dump({"pad_token": pad_entry}, f)
    return folder


@pytest.fixture(scope="module")
def reference_vocab(open_clip_tok):
    """open_clip's token -> id table, with the control tokens spelled as in vocab.json files."""
    spelling = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    return {spelling.get(token, token): i for token, i in open_clip_tok.encoder.items()}


def test_bundled_vocabulary_is_openai_clips_file():
    with open(BUNDLED_VOCAB, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    assert digest == "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"


def test_prompt_list_is_varied_enough():
    assert len(PROMPTS) >= 40
    assert len(set(PROMPTS)) == len(PROMPTS)


def test_clip_g_ids_equal_open_clip_with_bang_padding(tok_g, open_clip_tok):
    ours = tok_g(PROMPTS)
    assert ours.shape == (len(PROMPTS), CONTEXT_LENGTH) and ours.dtype == torch.long
    for prompt, got, want in zip(PROMPTS, ours, open_clip_tok(PROMPTS)):
        assert got.tolist() == want.tolist(), prompt


def test_clip_l_ids_equal_open_clip_with_eos_padding(tok_l, open_clip_tok):
    for prompt, got, want in zip(PROMPTS, tok_l(PROMPTS), _eos_padded(open_clip_tok(PROMPTS))):
        assert got.tolist() == want.tolist(), prompt


def test_encode_equals_open_clip_encode_without_truncation(tok_l, open_clip_tok):
    for prompt in PROMPTS:
        assert tok_l.encode(prompt) == open_clip_tok.encode(prompt), prompt


def test_long_prompt_loses_its_tail_but_keeps_eos(tok_l, tok_g):
    tokens = tok_g.encode(LONG)
    assert len(tokens) > 2 * CONTEXT_LENGTH  # far over the limit
    for tok in (tok_l, tok_g):
        ids = tok([LONG])[0]
        assert ids[0] == BOS_ID and ids[-1] == EOS_ID
        assert ids[1:-1].tolist() == tokens[: CONTEXT_LENGTH - 2]


def test_padding_conventions_differ_only_after_eos(tok_l, tok_g):
    ids_l, ids_g = tok_l(["a photo of a cat!!!", ""]), tok_g(["a photo of a cat!!!", ""])
    assert ids_l[0, :8].tolist() == ids_g[0, :8].tolist() == [BOS_ID, 320, 1125, 539, 320, 2368, 995, EOS_ID]
    assert (ids_l[0, 8:] == EOS_ID).all() and (ids_g[0, 8:] == 0).all()
    assert ids_l[1, :2].tolist() == ids_g[1, :2].tolist() == [BOS_ID, EOS_ID]
    assert eos_positions(ids_l).tolist() == eos_positions(ids_g).tolist() == [7, 1]


def test_ftfy_divergences_are_exactly_ftfys_repairs(tok_l, open_clip_tok):
    for prompt in FTFY_DIVERGENCES:
        assert tok_l.encode(prompt) != open_clip_tok.encode(prompt), prompt
        assert tok_l.encode(ftfy.fix_text(prompt)) == open_clip_tok.encode(prompt), prompt


def test_open_clip_drops_combining_ypogegrammeni_and_we_keep_it(tok_l, open_clip_tok):
    # open_clip compiles CLIP's pattern with IGNORECASE; on lower-cased text that changes one
    # thing: U+0345 (a combining Greek mark that case-folds to a letter) matches no branch
    # there and vanishes. We keep it as its own bytes. (A 40k-string random-Unicode sweep of
    # ftfy-clean text found no other difference.)
    assert open_clip_tok.encode("a\u0345b") == tok_l.encode("a b")
    assert tok_l.encode("a\u0345b") != tok_l.encode("a b")


def test_cleaning_does_what_ftfy_does_for_quotes_and_composition():
    assert clean_text("A  Woman’s “Hat”\n") == "a woman's \"hat\""
    assert clean_text("cafe\u0301") == "caf\u00e9"
    assert clean_text("&amp;amp;") == "&"


def test_special_token_strings_in_a_prompt_are_plain_text(tok_l, open_clip_tok):
    # Like open_clip, a literal "<|endoftext|>" is just characters ...
    assert tok_l.encode("a <|endoftext|> b") == open_clip_tok.encode("a <|endoftext|> b")
    # ... and open_clip's own spelling of its control tokens is too (open_clip maps it to EOS).
    assert EOS_ID not in tok_l.encode("a <end_of_text> b")
    assert EOS_ID in open_clip_tok.encode("a <end_of_text> b")
    ids = tok_l(["<|startoftext|> <|endoftext|>"])
    assert (ids == BOS_ID).sum() == 1 and eos_positions(ids).item() == 1 + len(tok_l.encode("<|startoftext|> <|endoftext|>"))


@pytest.fixture(scope="module")
def diffusers_folders(tmp_path_factory, reference_vocab):
    root = tmp_path_factory.mktemp("tokenizers")
    return {
        "tokenizer": _write_diffusers_folder(str(root / "tokenizer"), reference_vocab, "<|endoftext|>"),
        "tokenizer_2": _write_diffusers_folder(str(root / "tokenizer_2"), reference_vocab, "!"),
    }


def test_diffusers_folders_give_the_bundled_tokenizers(diffusers_folders, tok_l, tok_g):
    from_l = tokenizer_from_diffusers(diffusers_folders["tokenizer"])
    from_g = tokenizer_from_diffusers(diffusers_folders["tokenizer_2"])
    assert (from_l.pad_id, from_g.pad_id) == (EOS_ID, 0)
    assert torch.equal(from_l(PROMPTS), tok_l(PROMPTS))
    assert torch.equal(from_g(PROMPTS), tok_g(PROMPTS))


def test_diffusers_pad_token_read_from_added_token_record_in_tokenizer_config(tmp_path, reference_vocab):
    record = {"content": "!", "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
    folder = _write_diffusers_folder(str(tmp_path), reference_vocab, record, file="tokenizer_config.json")
    assert tokenizer_from_diffusers(folder).pad_id == 0


def test_missing_tokenizer_files_raise_user_error(tmp_path):
    with pytest.raises(UserError, match="vocab.json"):
        tokenizer_from_diffusers(str(tmp_path))


def test_a_bare_string_is_rejected_not_split_into_characters(tok_l):
    with pytest.raises(TypeError, match="list"):
        tok_l("a woman reading")


def test_unknown_pad_convention_is_rejected():
    with pytest.raises(ValueError, match="pad"):
        Tokenizer.bundled("<pad>")


@pytest.fixture(scope="module")
def hf_tokenizers(diffusers_folders):
    from transformers import CLIPTokenizer

    return {pad: CLIPTokenizer.from_pretrained(diffusers_folders[name]) for pad, name in (("eos", "tokenizer"), ("!", "tokenizer_2"))}


def _hf_ids(hf, prompts):
    return hf(prompts, padding="max_length", max_length=CONTEXT_LENGTH, truncation=True, return_tensors="pt").input_ids


def test_transformers_tokenizer_agrees_where_it_does_clip_cleaning(hf_tokenizers, tok_l, tok_g):
    agree_l = [p for p in PROMPTS if not HF_CLEANING_DIVERGENCES & set(p)]
    agree_g = [p for p in agree_l if "!" not in p]
    assert len(agree_g) >= 30
    assert torch.equal(_hf_ids(hf_tokenizers["eos"], agree_l), tok_l(agree_l))
    assert torch.equal(_hf_ids(hf_tokenizers["!"], agree_g), tok_g(agree_g))


def test_transformers_tokenizer_skips_html_cleaning_and_quote_repair(hf_tokenizers, tok_l, open_clip_tok):
    for prompt in ("fish &amp; chips", "a woman’s hat"):
        ours = tok_l([prompt])
        assert ours[0].tolist() == _eos_padded(open_clip_tok([prompt]))[0].tolist()
        assert not torch.equal(_hf_ids(hf_tokenizers["eos"], [prompt]), ours), prompt


def test_transformers_tokenizer_with_bang_pad_turns_every_bang_into_pad(hf_tokenizers, tok_g):
    # SDXL's second tokenizer in diffusers has pad_token "!": each "!" becomes a separate id 0
    # instead of CLIP's "!!!</w>" token. Ours (like open_clip) keeps the word.
    hf = _hf_ids(hf_tokenizers["!"], ["wow!!!"])[0, :6].tolist()
    ours = tok_g(["wow!!!"])[0, :6].tolist()
    assert hf == [BOS_ID, 2781, 0, 0, 0, EOS_ID]
    assert ours == [BOS_ID, 2781, 995, EOS_ID, 0, 0]
    # With "<|endoftext|>" as pad (SDXL's first tokenizer), "!" is tokenized normally.
    assert _hf_ids(hf_tokenizers["eos"], ["wow!!!"])[0, :4].tolist() == [BOS_ID, 2781, 995, EOS_ID]
