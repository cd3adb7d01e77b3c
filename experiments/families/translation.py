"""Few-shot translation from languages never seen in meta-training into English: CLDR terms and
Tatoeba sentences; a character-level encoder-decoder (or the shared encoder and a decoder);
chrF and BLEU (sacrebleu) of greedy decodes."""

from __future__ import annotations

import numpy as np
from flax import nnx

import metaflax as mf
from experiments.families.common import Family, Pooled, Shared, TestAdapt, evaluate_chunks
from metaflax import seq2seq
from metaflax.data import cldr, corpora, families
from metaflax.data.text import BOS, EOS, CharVocab

DATASETS = ("cldr_terms", "tatoeba")


def split_languages(languages, config):
    """``(meta-train, meta-test)`` languages: ``languages.num_test`` held out by its seed."""
    train, _, test = cldr.language_split(
        languages, config.languages.num_test, 0, seed=config.languages.split_seed
    )
    return train, test


def translation_pairs(config) -> tuple[dict, dict]:
    """``({language: [(source, english)]}, ...)`` for meta-train and meta-test languages."""
    if config.dataset == "cldr_terms":
        pairs = corpora.cldr_term_pairs(min_terms=config.languages.min_cldr_terms)
    else:  # tatoeba
        pairs = corpora.tatoeba_pairs(path=config.data_dir or None)
        need = max(config.shots, max(config.eval.shots)) + max(config.queries, config.eval.queries)
        pairs = {k: v for k, v in pairs.items() if len(v) >= need}
    train_langs, test_langs = split_languages(sorted(pairs), config)
    return {k: pairs[k] for k in train_langs}, {k: pairs[k] for k in test_langs}


def _char_model(config, train_pairs, src_len, tgt_len):
    """A character-level :class:`seq2seq.Seq2Seq` and its vocabulary's encoders."""
    vocab = CharVocab.build(t for p in train_pairs.values() for pair in p for t in pair)
    model = seq2seq.Seq2Seq(
        len(vocab),
        max_len=tgt_len,
        dim=config.model.hidden,
        num_layers=config.model.layers,
        num_heads=config.model.heads,
        mlp_dim=config.model.mlp,
        rngs=nnx.Rngs(config.seed),
    )
    apply_fn, params = mf.functionalize(model)
    start_fn, _ = mf.functionalize(model, "start_decoding")
    step_fn, _ = mf.functionalize(model, "decode_step")
    text = dict(
        vocab_size=len(vocab),
        bos=BOS,
        eos=EOS,
        decode=vocab.decode,
        enc_src=lambda xs: vocab.encode(xs, src_len),
        enc_tgt=lambda xs: vocab.encode(xs, tgt_len, bos_eos=True),
    )
    return text, (apply_fn, start_fn, step_fn), params


def _shared_model(config, shared: Shared, tgt_len, src_len):
    """The shared (BERT) encoder with a :class:`seq2seq.Decoder`, on the shared word-piece
    tokenizer ([CLS] / [SEP] as BOS / EOS)."""
    tok = shared.tokenizer

    def encode(xs, n):
        enc = tok(
            list(xs), max_length=n, truncation=True, padding="max_length", return_tensors="np"
        )
        return enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(bool)

    text = dict(
        vocab_size=len(tok),
        bos=tok.cls_token_id,
        eos=tok.sep_token_id,
        decode=lambda ids: tok.decode([int(i) for i in ids], skip_special_tokens=True),
        enc_src=lambda xs: encode(xs, src_len),
        enc_tgt=lambda xs: encode(xs, tgt_len),  # [CLS] words [SEP]: the BOS and EOS of decoding
    )
    encode_fn, encoder_params, hidden, _ = shared.encoder
    decoder = seq2seq.Decoder(
        len(tok),
        memory_dim=hidden,
        max_len=tgt_len,
        dim=config.model.hidden,
        num_layers=config.model.layers,
        num_heads=config.model.heads,
        mlp_dim=config.model.mlp,
        rngs=nnx.Rngs(config.seed + 1),
    )
    decoder_apply, decoder_params = mf.functionalize(decoder)
    decoder_start, _ = mf.functionalize(decoder, "start_decoding")
    step_decoder, _ = mf.functionalize(decoder, "decode_step")
    params = {"encoder": encoder_params, "decoder": decoder_params}

    def apply_fn(p, src, src_mask, tgt_in, tgt_mask):
        memory, _ = encode_fn(p["encoder"], src, src_mask)
        return decoder_apply(p["decoder"], memory, src_mask, tgt_in, tgt_mask)

    def start_fn(p, src, src_mask, max_len):
        memory, _ = encode_fn(p["encoder"], src, src_mask)
        return decoder_start(p["decoder"], memory, src_mask, max_len)

    def step_fn(p, state, token, i):
        return step_decoder(p["decoder"], state, token, i)

    return text, (apply_fn, start_fn, step_fn), params


def translation_family(config, shared: Shared | None = None) -> Family:
    """Few-shot translation from languages never seen in meta-training; chrF and BLEU.

    On its own: a character-level encoder-decoder. With ``shared``: the shared (BERT) encoder,
    the shared word-piece tokenizer and a :class:`seq2seq.Decoder`.
    """
    train_pairs, test_pairs = translation_pairs(config)
    src_len, tgt_len = config.max_len, config.max_len + 2
    if shared is None:
        text, fns, params = _char_model(config, train_pairs, src_len, tgt_len)
    else:
        text, fns, params = _shared_model(config, shared, tgt_len, src_len)
    apply_fn, start_fn, step_fn = fns
    enc_src, enc_tgt, decode = text["enc_src"], text["enc_tgt"], text["decode"]

    sampler = families.translation_sampler(
        train_pairs, enc_src, enc_tgt, shots=config.shots, queries=config.queries
    )
    loss_fn = seq2seq.seq2seq_loss_fn(apply_fn)
    pooled = [pair for p in train_pairs.values() for pair in p]
    pooled_src, pooled_src_mask = enc_src([a for a, _ in pooled])
    pooled_tgt, pooled_tgt_mask = enc_tgt([b for _, b in pooled])
    per_step = config.meta_batch_size * (config.shots + config.queries)

    def multitask_batch(seed, step):
        rows = np.random.default_rng([seed, step]).choice(len(pooled), per_step, False)
        return {
            "src": pooled_src[rows],
            "src_mask": pooled_src_mask[rows],
            "tgt": pooled_tgt[rows],
            "tgt_mask": pooled_tgt_mask[rows],
        }

    def greedy(adapted, episode, k):
        q = episode.query
        return seq2seq.greedy_decode(
            start_fn,
            step_fn,
            adapted,
            q["src"],
            q["src_mask"],
            bos_id=text["bos"],
            eos_id=text["eos"],
            max_len=tgt_len,
        )

    def evaluate(adapt: TestAdapt, params, shots: int, steps, cfg) -> dict:
        test_sampler = families.translation_sampler(
            test_pairs, enc_src, enc_tgt, shots=shots, queries=cfg.eval.queries
        )
        scores = {"chrf": [], "bleu": []}
        chunks = evaluate_chunks(greedy, adapt, params, test_sampler, shots, steps, cfg)
        for eps, decoded in chunks:
            for e in range(decoded.shape[0]):  # [episodes, steps, queries, len]
                refs = [decode(t) for t in eps.query["tgt"][e]]
                per_steps = [
                    seq2seq.translation_metrics([decode(t) for t in decoded[e, j]], refs)
                    for j in range(len(steps))
                ]
                for m in scores:
                    scores[m].append([s[m] / 100 for s in per_steps])
        return {m: np.asarray(v)[: cfg.eval.num_episodes] for m, v in scores.items()}

    return Family(
        metrics=("chrf", "bleu"),
        train_metric="token_accuracy",
        loss_fn=loss_fn,
        params=params,
        task_init=None,
        meta_batch=sampler.meta_batch,
        evaluate=evaluate,
        to_task_params=lambda p: p,
        info={
            "meta_train_languages": sorted(train_pairs),
            "meta_test_languages": sorted(test_pairs),
            "vocab_size": text["vocab_size"],
        },
        pooled=Pooled(params, multitask_batch, per_step),
    )
