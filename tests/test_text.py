"""Prompts, the identifier "f l", and the CLIP text encoder with injected tokens vs transformers."""
import warnings

import jax
import numpy as np
import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel

from f2d_jax import convert
from f2d_jax.models import CLIPTextEncoder, inject_tokens
from f2d_jax.text import PromptError, class_ids, identifier_ids, identifier_prompts, load_tokenizer, token_ids
from f2d_jax.torch import text_transformer

TINY_CLIP = dict(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=3,
                 num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu")


def test_bundled_tokenizer_is_sd_v1():
    tokenizer = load_tokenizer()
    assert len(tokenizer) == 49408
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (49406, 49407, 49407)
    assert identifier_ids(tokenizer) == (325, 331) and class_ids(tokenizer) == (320, 2533)  # "a person"
    # Same ids as the Hugging Face call the official code makes (truncation to 77 included).
    for prompt in ["f l eating bread in front of the Eiffel Tower", "a photo of a person", "",
                   " ".join(["word"] * 100) + " f l"]:
        expected = tokenizer(prompt, padding="max_length", truncation=True, max_length=77).input_ids
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            np.testing.assert_array_equal(token_ids(prompt, tokenizer)[0], expected)


@pytest.mark.parametrize("prompt, position", [
    ("f l eating bread in front of the Eiffel Tower", 1),
    ("a photo of f l", 4),
    ("A photo of F L, smiling!", 4),             # CLIP lowercases
    ("Portrait of (f l) in Paris.", 4),          # "(" is its own token
    ("f l's dog, with f l", 1),                  # the first occurrence
    ("f stop photo of f l", 5),                  # a lone "f" is not the identifier
    ("fl f.l f l", 5),                           # "fl" is one token; "f.l" is not the identifier
])
def test_identifier_position(prompt, position):
    ids, positions = identifier_prompts([prompt])
    assert positions[0] == position
    assert ids.shape == (1, 77) and ids.dtype == np.int32
    assert tuple(ids[0, position:position + 2]) == (325, 331)
    assert ids[0, 0] == 49406 and ids[0, -1] == 49407  # start token, padded with end-of-text


@pytest.mark.parametrize("prompt", ["a photo of a person", "fl eating bread", "f. l", "F-L"])
def test_prompt_without_identifier_is_an_error(prompt):
    with pytest.raises(PromptError, match=r"no identifier 'f l'.*a photo of f l"):
        identifier_prompts(prompt)


def test_identifier_cut_off_by_truncation_is_an_error():
    cut_l = " ".join(["word"] * 74) + " f l"     # "f" is token 75 (the last kept), "l" is cut
    with pytest.warns(UserWarning, match="76 tokens long"):
        with pytest.raises(PromptError, match=r"cut off: the prompt is 76 tokens long .* first 75"):
            identifier_prompts(cut_l)
    kept = "f l " + " ".join(["word"] * 100)    # long, but the identifier survives: a warning only
    with pytest.warns(UserWarning, match="reads only the first 75"):
        _, positions = identifier_prompts(kept)
    assert positions[0] == 1


def test_inject_tokens_writes_only_the_identifier_positions():
    hidden = jax.random.normal(jax.random.key(0), (2, 77, 8))
    tokens = jax.random.normal(jax.random.key(1), (2, 2, 8))
    out = np.asarray(inject_tokens(hidden, tokens, np.array([3, 75])))
    np.testing.assert_array_equal(out[0, 3:5], tokens[0])
    np.testing.assert_array_equal(out[1, 75:77], tokens[1])
    keep = np.ones((2, 77), bool)
    keep[0, 3:5] = keep[1, 75:77] = False
    np.testing.assert_array_equal(out[keep], np.asarray(hidden)[keep])


def _official_injected_forward(model, input_ids, first, last, positions):
    """The official pipeline: embeddings, overwrite pos and pos+1, causal encoder, final norm."""
    text = text_transformer(model)
    hidden = text.embeddings(input_ids=input_ids)
    rows = torch.arange(len(input_ids))
    hidden[rows, positions] = first
    hidden[rows, positions + 1] = last
    length = hidden.shape[1]  # additive causal mask: the lowest float above the diagonal
    mask = torch.full((length, length), torch.finfo(hidden.dtype).min, device=hidden.device).triu(1)[None, None]
    return text.final_layer_norm(text.encoder(inputs_embeds=hidden, attention_mask=mask).last_hidden_state)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    torch.manual_seed(0)
    model = CLIPTextModel(CLIPTextConfig(**TINY_CLIP)).eval()
    with torch.no_grad():  # non-trivial norms and biases
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    directory = tmp_path_factory.mktemp("clip")
    model.save_pretrained(directory)  # model.safetensors
    ours = CLIPTextEncoder(width=32, num_layers=3, num_heads=4, mlp_dim=37)
    return model, ours, convert.load("text_encoder", directory / "model.safetensors", ours)


def test_clip_matches_transformers_without_injection(tiny_clip, parity):
    model, ours, variables = tiny_clip
    ids = token_ids(["a photo of a person", "f l eating bread in front of the Eiffel Tower", ""])
    hidden, pooled = ours.apply(variables, ids)
    with torch.no_grad():
        out = model(torch.from_numpy(ids).long())
    parity("CLIP last_hidden_state (no injection)",
           np.abs(np.asarray(hidden) - out.last_hidden_state.numpy()).max(), 1e-4)
    parity("CLIP pooled output", np.abs(np.asarray(pooled) - out.pooler_output.numpy()).max(), 1e-4)


def test_clip_matches_official_injection(tiny_clip, parity):
    model, ours, variables = tiny_clip
    ids, positions = identifier_prompts(["a photo of f l", "f l eating bread in front of the Eiffel Tower"])
    rng = np.random.default_rng(0)
    first, last = rng.normal(size=(2, 2, 32)).astype(np.float32)
    hidden, _ = jax.jit(ours.apply)(variables, ids, np.stack([first, last], 1), positions)
    with torch.no_grad():
        expected = _official_injected_forward(model, torch.from_numpy(ids).long(), torch.from_numpy(first),
                                              torch.from_numpy(last), torch.from_numpy(positions).long())
    parity("CLIP last_hidden_state with injected f l", np.abs(np.asarray(hidden) - expected.numpy()).max(), 1e-4)
    # The injection matters: the same prompts without it differ after the identifier.
    plain, _ = ours.apply(variables, ids)
    assert np.abs(np.asarray(plain)[0, 4:] - np.asarray(hidden)[0, 4:]).max() > 1e-2
    np.testing.assert_allclose(np.asarray(plain)[0, :4], np.asarray(hidden)[0, :4], atol=1e-6)  # causal
