"""model/mapper.py: codes, the mapping network, concept lookup, insertion (eq. 4), mapper files."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import model.checkpoint as checkpoint
from model.checkpoint import CheckpointError, load_mapper, read_metadata, save_mapper
from model.errors import UserError
from model.mapper import (
    Mapper,
    MapperConfig,
    code_to_z,
    embedding_stats,
    find_concept,
    insert,
    insert_many,
    insert_subjects,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BOS, EOS = 49406, 49407  # CLIP's special tokens (model/clip.py defines them; restated so this test stands alone)
TINY = MapperConfig(z_dim=16, depth=3, hidden=32, token_widths=(24, 40))


def token_tables(widths=TINY.token_widths, V=3000):
    """Stand-in token tables whose dimensions have different means and spreads, like CLIP's."""
    g = torch.Generator().manual_seed(1)
    return [torch.randn(D, generator=g) * 0.5 + torch.randn(V, D, generator=g) * (0.01 + 0.1 * torch.rand(D, generator=g))
            for D in widths]


def tiny_mapper(config=TINY):
    return Mapper(config, [embedding_stats(t) for t in token_tables(config.token_widths)])


# -- codes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("code", [0, 42, 2**63 - 1])
def test_code_to_z_is_a_standard_normal_draw_seeded_by_the_code(code):
    expected = torch.randn(512, generator=torch.Generator("cpu").manual_seed(code), dtype=torch.float64).float()
    torch.manual_seed(123)  # the global generator plays no part
    z = code_to_z(code, 512)
    assert z.dtype == torch.float32 and z.shape == (512,)
    assert torch.equal(z, expected)
    assert torch.equal(code_to_z(code, 512), z)


def test_different_codes_give_different_z_and_numpy_integers_are_codes():
    assert not torch.equal(code_to_z(1, 64), code_to_z(2, 64))
    assert torch.equal(code_to_z(np.int64(7), 64), code_to_z(7, 64))


@pytest.mark.parametrize("code", [-1, 2**63, 1.5, "42", True])
def test_code_outside_0_to_2_pow_63_is_a_user_error(code):
    with pytest.raises(UserError, match="code"):
        code_to_z(code, 8)


# -- the mapping network -------------------------------------------------------------------------


@pytest.mark.parametrize("activation", ["leaky_relu", "gelu"])
@pytest.mark.parametrize("depth", [1, 3])
def test_mapper_gives_one_pseudo_word_per_encoder_width(depth, activation):
    config = MapperConfig(z_dim=16, depth=depth, hidden=32, token_widths=(24, 40), activation=activation)
    f = tiny_mapper(config)
    w_l, w_g = f(torch.randn(5, 16))
    assert w_l.shape == (5, 24) and w_g.shape == (5, 40)
    assert len(f.layers) == depth - 1


def test_untrained_mapper_gives_vectors_on_the_scale_of_real_tokens():
    tables = token_tables()
    f = Mapper(TINY, [embedding_stats(t) for t in tables])
    z = torch.stack([code_to_z(code, TINY.z_dim) for code in range(200)])
    with torch.no_grad():
        words = f(z)
    for w, table in zip(words, tables):
        mean, std = table.mean(0), table.std(0)
        # each pseudo-word is the mean token plus a unit-mean-square deviation in units of the table's spread
        assert torch.allclose(((w - mean) / std).pow(2).mean(-1), torch.ones(len(z)), atol=1e-3)
        # ... so its length lies within the lengths of the real tokens
        norms, table_norms = w.norm(dim=-1), table.norm(dim=-1)
        assert table_norms.min() <= norms.min() and norms.max() <= table_norms.max()
        # and codes are not collapsed onto one word: they sit as far apart as real tokens, within 2x
        spread = torch.cdist(w[:100], w[100:]).mean() / torch.cdist(table[:100], table[100:200]).mean()
        assert 0.5 < spread < 2.0


def test_mapper_rejects_token_statistics_of_the_wrong_widths():
    with pytest.raises(ValueError, match="widths"):
        Mapper(TINY, [embedding_stats(t) for t in token_tables((24, 41))])


@pytest.mark.parametrize("change", [{"depth": 0}, {"activation": "tanh"}])
def test_mapper_rejects_an_impossible_config(change):
    config = MapperConfig(**{**TINY.__dict__, **change})
    with pytest.raises(ValueError, match="depth"):
        Mapper(config, [embedding_stats(t) for t in token_tables()])


def test_token_statistics_are_fixed_buffers_not_trainable_parameters():
    f = tiny_mapper()
    names = {n for n, _ in f.named_parameters()}
    assert not any("token_" in n for n in names)
    assert {"heads.0.token_mean", "heads.1.token_std"} <= set(f.state_dict())


# -- concept lookup ------------------------------------------------------------------------------


def test_find_concept_returns_the_first_occurrence_after_bos():
    ids = [BOS, 320, 2308, 533, 320, 2308, EOS, EOS]  # "a woman and a woman"
    assert find_concept(ids, [2308], word="woman", prompt="a woman and a woman") == 2


def test_find_concept_of_a_multi_token_word_points_at_its_first_token():
    ids = [BOS, 320, 71, 72, 73, 533, EOS]  # the word is the three tokens 71 72 73
    assert find_concept(ids, [71, 72, 73], word="astronaut", prompt="an astronaut reading") == 2
    # a partial match (first two tokens then something else) does not count
    with pytest.raises(UserError):
        find_concept([BOS, 71, 72, 9, EOS], [71, 72, 73], word="astronaut", prompt="p")


def test_absent_concept_is_one_user_error_naming_word_and_prompt():
    with pytest.raises(UserError) as err:
        find_concept([BOS, 320, 1929, EOS], [2308], word="woman", prompt="a man reading")
    message = str(err.value)
    assert "'woman'" in message and "'a man reading'" in message and "--concept" in message
    with pytest.raises(UserError):
        find_concept([BOS, 320, EOS], [], word="", prompt="a")


# -- insertion (eq. 4) ---------------------------------------------------------------------------


def numbered_embeddings(B, L, D=3):
    """e[b, p] = (100·b + p) in every channel, so each row says where it came from."""
    rows = 100 * torch.arange(B)[:, None] + torch.arange(L)[None, :]
    return rows[..., None].expand(B, L, D).float().clone()


def reference_insert(row, w, i, eos, L):
    """Eq. 4 on a Python list: insert, then cut to L, dropping the token before the EOS if the EOS would fall off."""
    new = row[:i] + [w] + row[i:]
    if eos == L - 1:  # the prompt filled the sequence: lose its last word, keep the EOS
        return new[:L - 1] + [row[eos]]
    return new[:L]


def test_insert_places_w_at_i_shifts_later_tokens_and_keeps_77_tokens():
    B, L = 3, 77
    e = numbered_embeddings(B, L)
    w = torch.tensor([-1.0, -2.0, -3.0])[:, None].expand(B, 3)
    i, eos = torch.tensor([2, 5, 1]), torch.tensor([4, 10, 76])
    e_hat, eos_hat = insert(e, w, i, eos)
    assert e_hat.shape == (B, L, 3)
    for b in range(B):
        expected = reference_insert(e[b, :, 0].tolist(), w[b, 0].item(), i[b].item(), eos[b].item(), L)
        assert e_hat[b, :, 0].tolist() == expected
        assert torch.equal(e_hat[b, eos_hat[b]], e[b, eos[b]])  # the EOS survived, at eos_hat
    assert eos_hat.tolist() == [5, 11, 76]


def test_insert_into_a_full_prompt_drops_the_last_word_never_the_eos():
    L = 8
    e = numbered_embeddings(1, L)  # tokens 0..6 are BOS + words, 7 is the EOS
    e_hat, eos_hat = insert(e, torch.full((1, 3), -1.0), torch.tensor([3]), torch.tensor([L - 1]))
    assert e_hat[0, :, 0].tolist() == [0, 1, 2, -1, 3, 4, 5, 7]  # word 6 is gone, the EOS 7 stays last
    assert eos_hat.tolist() == [L - 1]


def test_gradient_of_the_inserted_sequence_reaches_w_at_position_i():
    e = torch.randn(2, 77, 4)
    w = torch.randn(2, 4, requires_grad=True)
    i, eos = torch.tensor([3, 7]), torch.tensor([9, 12])
    e_hat, _ = insert(e, w, i, eos)
    weight = torch.randn_like(e_hat)
    (e_hat * weight).sum().backward()
    assert torch.equal(w.grad, weight[torch.arange(2), i])


def test_insert_casts_w_to_the_embeddings_dtype():
    e = torch.randn(1, 77, 4, dtype=torch.bfloat16)
    e_hat, _ = insert(e, torch.randn(1, 4), torch.tensor([1]), torch.tensor([2]))
    assert e_hat.dtype == torch.bfloat16


@pytest.mark.parametrize("i", [0, 4, 5])
def test_insert_position_on_bos_or_at_or_after_eos_is_refused(i):
    with pytest.raises(ValueError, match="before the EOS"):
        insert(torch.randn(1, 77, 4), torch.randn(1, 4), torch.tensor([i]), torch.tensor([4]))


@pytest.mark.parametrize("order", [(0, 1), (1, 0)])
def test_insert_many_puts_each_pseudo_word_directly_before_its_own_concept(order):
    # "a man and a woman": BOS a man and a woman EOS
    ids = [BOS, 320, 1929, 537, 320, 2308, EOS] + [EOS] * 70
    e = torch.tensor(ids, dtype=torch.float32)[None, :, None]
    pairs = [(torch.tensor([[-1.0]]), torch.tensor([2])),   # w1 before "man"
             (torch.tensor([[-2.0]]), torch.tensor([5]))]   # w2 before "woman"
    e_hat, eos_hat = insert_many(e, [pairs[k] for k in order], torch.tensor([6]))
    assert e_hat[0, :9, 0].tolist() == [BOS, 320, -1, 1929, 537, 320, -2, 2308, EOS]
    assert eos_hat.tolist() == [8] and e_hat.shape == (1, 77, 1)


def test_insert_many_with_two_codes_for_one_concept_keeps_both_before_it_in_order():
    e = torch.tensor([BOS, 320, 2308, EOS, EOS, EOS], dtype=torch.float32)[None, :, None]
    pairs = [(torch.tensor([[-1.0]]), torch.tensor([2])), (torch.tensor([[-2.0]]), torch.tensor([2]))]
    e_hat, eos_hat = insert_many(e, pairs, torch.tensor([3]))
    assert e_hat[0, :, 0].tolist() == [BOS, 320, -1, -2, 2308, EOS]
    assert eos_hat.tolist() == [5]


class WordTokenizer:
    """A stand-in for model/clip.Tokenizer.encode: one id per known word, two for 'astronaut'."""

    vocab = {"a": [320], "man": [1929], "woman": [2308], "and": [537], "reading": [2803], "astronaut": [71, 72]}

    def encode(self, text):
        return [t for word in text.split() for t in self.vocab[word]]

    def __call__(self, prompts, L=12):
        rows = [[BOS] + self.encode(p) + [EOS] for p in prompts]
        return torch.tensor([r + [EOS] * (L - len(r)) for r in rows])


def test_insert_subjects_finds_each_concept_in_every_prompt_of_the_batch():
    tok = WordTokenizer()
    prompts = ["a woman reading", "a astronaut and a woman"]
    ids = tok(prompts)
    e = ids.float()[..., None]
    eos = (ids == EOS).int().argmax(dim=1)
    w_astro, w_woman = torch.tensor([-1.0]), torch.tensor([[-2.0], [-3.0]])  # one for all, one per prompt
    e_hat, eos_hat = insert_subjects(e, eos, ids, tok, [(w_woman, "woman")], prompts)
    assert e_hat[0, :6, 0].tolist() == [BOS, 320, -2, 2308, 2803, EOS]
    assert e_hat[1, :8, 0].tolist() == [BOS, 320, 71, 72, 537, 320, -3, 2308]
    e_hat, _ = insert_subjects(e[1:], eos[1:], ids[1:], tok, [(w_woman[1], "woman"), (w_astro, "astronaut")], prompts[1:])
    assert e_hat[0, :10, 0].tolist() == [BOS, 320, -1, 71, 72, 537, 320, -3, 2308, EOS]
    with pytest.raises(UserError, match="'a woman reading'"):
        insert_subjects(e, eos, ids, tok, [(w_astro, "astronaut")], prompts)


def test_insert_subjects_takes_one_concept_word_per_prompt():
    # A training batch mixes concepts: each prompt's pseudo-word goes before its own word.
    tok = WordTokenizer()
    prompts = ["a man reading", "a woman reading"]
    ids = tok(prompts)
    e = ids.float()[..., None]
    eos = (ids == EOS).int().argmax(dim=1)
    w = torch.tensor([[-1.0], [-2.0]])
    e_hat, eos_hat = insert_subjects(e, eos, ids, tok, [(w, ["man", "woman"])], prompts)
    assert e_hat[0, :6, 0].tolist() == [BOS, 320, -1, 1929, 2803, EOS]
    assert e_hat[1, :6, 0].tolist() == [BOS, 320, -2, 2308, 2803, EOS]
    with pytest.raises(UserError, match="'a man reading'"):
        insert_subjects(e, eos, ids, tok, [(w, ["woman", "woman"])], prompts)


# -- mapper files --------------------------------------------------------------------------------


def test_saved_mapper_loads_back_with_identical_outputs_config_and_metadata(tmp_path):
    f = tiny_mapper()
    path = str(tmp_path / "mapper.safetensors")
    save_mapper(path, f, {"train_args": '{"steps": 10}'})
    g = load_mapper(path)
    assert g.config == f.config
    z = torch.randn(4, TINY.z_dim)
    for a, b in zip(f(z), g(z)):
        assert torch.equal(a, b)
    assert read_metadata(path)["train_args"] == '{"steps": 10}'
    assert not g.training and not any(p.requires_grad for p in g.parameters())


def test_load_mapper_refuses_a_file_that_is_not_a_mapper(tmp_path):
    other = str(tmp_path / "unet.safetensors")
    save_file({"weight": torch.zeros(2)}, other)
    with pytest.raises(CheckpointError, match="not a CoCoIns mapper"):
        load_mapper(other)
    garbage = tmp_path / "mapper.safetensors"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError):
        load_mapper(str(garbage))


def test_load_mapper_refuses_a_mapper_file_with_a_corrupt_config(tmp_path):
    path = str(tmp_path / "mapper.safetensors")
    save_file(tiny_mapper().state_dict(), path, metadata={"format": "cocoins-mapper", "mapper_config": "{not json"})
    with pytest.raises(CheckpointError, match="config"):
        load_mapper(path)


def test_a_save_that_fails_midway_leaves_the_previous_file_and_no_partial_one(tmp_path, monkeypatch):
    path = str(tmp_path / "mapper.safetensors")
    first = tiny_mapper()
    save_mapper(path, first)
    before = open(path, "rb").read()

    def crash_midway(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x00" * 100)  # half a file, then the process "dies"
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save_file", crash_midway)
    second = Mapper(TINY, [embedding_stats(t) for t in token_tables()])
    with pytest.raises(KeyboardInterrupt):
        save_mapper(path, second)
    assert open(path, "rb").read() == before
    assert os.listdir(tmp_path) == ["mapper.safetensors"]
    monkeypatch.undo()
    save_mapper(path, second)  # a successful save replaces the file
    z = torch.randn(2, TINY.z_dim)
    assert torch.equal(load_mapper(path)(z)[0], second(z)[0])


# -- with the real CLIP tokenizer ----------------------------------------------------------------

@pytest.mark.parametrize("pad", ["eos", "!"])
def test_pseudo_words_land_before_concepts_in_real_clip_token_sequences(pad):
    from model import clip

    tok = clip.Tokenizer.bundled(pad=pad)
    long_prompt = "a snowboarder and a woman " + "reading a book " * 40  # truncated to 77 tokens
    prompts = ["a photo of a Woman reading", long_prompt]
    ids = tok(prompts)
    eos = clip.eos_positions(ids)
    e = ids.float()[..., None]  # each "embedding" is its token id
    subjects = [(torch.tensor([-1.0]), "snowboarder"), (torch.tensor([-2.0]), "woman")]
    e_hat, eos_hat = insert_subjects(e[1:], eos[1:], ids[1:], tok, subjects, prompts[1:])
    snow, boarder = tok.encode("snowboarder")  # two BPE tokens: the pseudo-word precedes both
    assert e_hat[0, :9, 0].tolist() == [clip.BOS_ID, 320, -1, snow, boarder, 537, 320, -2, tok.encode("woman")[0]]
    assert eos_hat.tolist() == [76] and e_hat[0, 76, 0].item() == clip.EOS_ID
    e_hat, eos_hat = insert_subjects(e[:1], eos[:1], ids[:1], tok, subjects[1:], prompts[:1])
    assert e_hat[0, :9, 0].tolist() == [clip.BOS_ID, 320, 1125, 539, 320, -2, 2308, 2337, clip.EOS_ID]
    assert eos_hat.tolist() == [eos[0].item() + 1] and e_hat[0, 9, 0].item() == tok.pad_id


def test_the_same_mapper_saved_by_two_processes_is_the_same_bytes(tmp_path):
    # safetensors orders metadata as a Rust HashMap does, differently in every process: a file's bytes (and
    # so its SHA-256, which the shipped toy model's manifest and the embeddings' metadata name) would change
    # from run to run without the sorted header.
    script = (
        "import sys, torch; sys.path.insert(0, sys.argv[1])\n"
        "from model.checkpoint import save_mapper\n"
        "from model.mapper import Mapper, MapperConfig\n"
        "torch.manual_seed(0)\n"
        "f = Mapper(MapperConfig(z_dim=4, depth=2, hidden=8, token_widths=(6, 10)),"
        " [(torch.zeros(6), torch.ones(6)), (torch.zeros(10), torch.ones(10))])\n"
        "save_mapper(sys.argv[2], f, metadata={k: 'value ' + k + ' γ' for k in 'abcdefghij'})\n")
    files = [tmp_path / f"m{k}.safetensors" for k in range(4)]
    for path in files:
        subprocess.run([sys.executable, "-c", script, ROOT, str(path)], check=True)
    assert len({path.read_bytes() for path in files}) == 1
    loaded = checkpoint.load_mapper(str(files[0]))
    meta = checkpoint.read_metadata(str(files[0]))
    assert meta["c"] == "value c γ" and meta["format"] == "cocoins-mapper" and loaded.config.hidden == 8
