"""Builds the tiny teacher checkpoints of tests/families.rs and their PyTorch reference
outputs: one randomly initialised, seeded model per family (RoBERTa, XLM-RoBERTa,
DistilBERT, DeBERTa-v3, and DeBERTa-v2 with separate position projections), each with a
tokenizer trained here on GLUE sentences, saved in the Hugging Face layout
(config.json, model.safetensors, tokenizer.json) under tests/families/<name>/, plus
reference.json: a right-padded batch's token ids, last hidden states and logits, and the
input-embedding gradient of a fixed scalar loss, all in fp32 eval mode.

    make families-fixtures        # or: python3 tests/families/make_families.py GLUE_DIR OUT_DIR

Needs torch, transformers and tokenizers (`make peer-deps`) and pyarrow. The weights are
seeded; the tokenizer trainers break ties in hash order, so a rerun may pick a slightly
different vocabulary, and the reference outputs are always those of the files written
beside them.
"""

import json
import os
import sys

import pyarrow.parquet as pq
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    DebertaV2Config,
    DebertaV2ForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
    XLMRobertaConfig,
    XLMRobertaForSequenceClassification,
)

SEED = 20231
NUM_LABELS = 2  # SST-2's classes: the end-to-end test fine-tunes these checkpoints on it
# Each logit's weight in the scalar loss whose input-embedding gradient is recorded.
LOGIT_WEIGHTS = [1.0, -2.0]
BATCH = [
    ("it 's a charming and often affecting journey .", None),
    ("unflinchingly bleak and desperate", None),
    ("A man is playing a flute.", "A man is playing a bamboo flute."),
    (
        "the acting , costumes , music , cinematography and sound are all astounding "
        "given the production 's austere locales and the direction .",
        None,
    ),
    (
        "Yucaipa owned Dominick 's before selling the chain to Safeway in 1998 .",
        "Yucaipa bought Dominick 's in 1995 and sold it to Safeway in 1998 .",
    ),
]


def glue_sentences(glue_dir, n=600):
    """The first `n` SST-2 sentences and MRPC sentence pairs of train: the tokenizers' corpus."""
    sst2 = pq.read_table(f"{glue_dir}/sst2/train-00000-of-00001.parquet", columns=["sentence"])
    mrpc = pq.read_table(
        f"{glue_dir}/mrpc/train-00000-of-00001.parquet", columns=["sentence1", "sentence2"]
    )
    out = sst2.column("sentence").to_pylist()[:n]
    out += mrpc.column("sentence1").to_pylist()[: n // 2] + mrpc.column("sentence2").to_pylist()[: n // 2]
    return out + [t for pair in BATCH for t in pair if t]


def template(tk, cls, sep, pair_sep, pair_type):
    """`cls A sep` and `cls A sep [sep] B sep`, the second text with token type `pair_type`."""
    second = f"{sep}:{pair_type} " if pair_sep else ""
    tk.post_processor = processors.TemplateProcessing(
        single=f"{cls}:0 $A:0 {sep}:0",
        pair=f"{cls}:0 $A:0 {sep}:0 {second}$B:{pair_type} {sep}:{pair_type}",
        special_tokens=[(t, tk.token_to_id(t)) for t in (cls, sep)],
    )


def byte_bpe(corpus, vocab):
    """RoBERTa's byte-level BPE."""
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tk.train_from_iterator(corpus, trainer)
    template(tk, "<s>", "</s>", True, 0)
    return tk, "<pad>"


def unigram(corpus, vocab, specials, cls, sep, pad, unk, pair_sep, pair_type):
    """A SentencePiece-style Unigram model (XLM-R, DeBERTa-v3)."""
    tk = Tokenizer(models.Unigram())
    tk.normalizer = normalizers.Sequence([normalizers.Replace("``", '"'), normalizers.NFKC()])
    tk.pre_tokenizer = pre_tokenizers.Metaspace()
    tk.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=vocab, special_tokens=specials, unk_token=unk)
    tk.train_from_iterator(corpus, trainer)
    template(tk, cls, sep, pair_sep, pair_type)
    return tk, pad


def wordpiece(corpus, vocab):
    """DistilBERT's uncased WordPiece."""
    tk = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tk.normalizer = normalizers.BertNormalizer(lowercase=True)
    tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tk.decoder = decoders.WordPiece()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tk.train_from_iterator(corpus, trainers.WordPieceTrainer(vocab_size=vocab, special_tokens=specials))
    template(tk, "[CLS]", "[SEP]", False, 1)
    return tk, "[PAD]"


def common(vocab):
    return dict(
        vocab_size=vocab,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        hidden_act="gelu",
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
        initializer_range=0.02,
        num_labels=NUM_LABELS,
    )


def roberta(corpus, cls=RobertaConfig, model=RobertaForSequenceClassification):
    tk, pad = byte_bpe(corpus, 420)
    cfg = cls(
        **common(tk.get_vocab_size()),
        hidden_size=32,
        max_position_embeddings=130,
        type_vocab_size=1,
        pad_token_id=tk.token_to_id(pad),
        bos_token_id=0,
        eos_token_id=2,
    )
    return tk, pad, model(cfg)


def xlm_roberta(corpus):
    tk, pad = unigram(
        corpus, 400, ["<s>", "<pad>", "</s>", "<unk>", "<mask>"], "<s>", "</s>", "<pad>", "<unk>", True, 0
    )
    cfg = XLMRobertaConfig(
        **common(tk.get_vocab_size()),
        hidden_size=32,
        max_position_embeddings=130,
        type_vocab_size=1,
        pad_token_id=tk.token_to_id(pad),
        bos_token_id=0,
        eos_token_id=2,
    )
    return tk, pad, XLMRobertaForSequenceClassification(cfg)


def distilbert(corpus):
    tk, pad = wordpiece(corpus, 400)
    cfg = DistilBertConfig(
        vocab_size=tk.get_vocab_size(),
        dim=32,
        n_layers=2,
        n_heads=4,
        hidden_dim=37,
        activation="gelu",
        dropout=0.1,
        attention_dropout=0.1,
        max_position_embeddings=128,
        initializer_range=0.02,
        pad_token_id=tk.token_to_id(pad),
        num_labels=NUM_LABELS,
    )
    return tk, pad, DistilBertForSequenceClassification(cfg)


def deberta(corpus, v3=True):
    specials = ["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"]
    tk, pad = unigram(corpus, 400, specials, "[CLS]", "[SEP]", "[PAD]", "[UNK]", False, 1)
    settings = (
        # DeBERTa-v3: shared position projections, log-bucketed distances, no absolute
        # positions, no token types; the embedding table is larger than the vocabulary.
        dict(share_att_key=True, position_buckets=16, max_relative_positions=-1, norm_rel_ebd="layer_norm",
             type_vocab_size=0, vocab_size=tk.get_vocab_size() + 5)
        if v3
        # DeBERTa-v2 style: separate position projections, plain clipped distances,
        # absolute positions and token types added to the input.
        else dict(share_att_key=False, position_buckets=-1, max_relative_positions=12, norm_rel_ebd="none",
                  type_vocab_size=2, vocab_size=tk.get_vocab_size(), position_biased_input=True)
    )
    base = common(settings.pop("vocab_size"))
    cfg = DebertaV2Config(
        **base,
        hidden_size=32,
        max_position_embeddings=128,
        relative_attention=True,
        pos_att_type=["p2c", "c2p"],
        position_biased_input=settings.pop("position_biased_input", False),
        layer_norm_eps=1e-7,
        pooler_hidden_size=32,
        pooler_hidden_act="gelu",
        pooler_dropout=0,
        pad_token_id=tk.token_to_id(pad),
        **settings,
    )
    return tk, pad, DebertaV2ForSequenceClassification(cfg)


FAMILIES = {
    "roberta": roberta,
    "xlm-roberta": xlm_roberta,
    "distilbert": distilbert,
    "deberta-v3": lambda c: deberta(c, True),
    "deberta-v2": lambda c: deberta(c, False),
}


def randomise(model, seed):
    """Every weight N(0, 0.1²), LayerNorm scales 1 + N(0, 0.1²): far enough from an
    initialisation's zeros and ones that a mis-wired weight shows in the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.1
            p.copy_(noise + 1.0 if "LayerNorm.weight" in name or "layer_norm.weight" in name else noise)


def encode_batch(tk, pad):
    encs = [tk.encode(t, p) if p is not None else tk.encode(t) for t, p in BATCH]
    width = max(len(e.ids) for e in encs)
    fill = lambda v, x: v + [x] * (width - len(v))  # noqa: E731
    return encs, {
        "input_ids": torch.tensor([fill(e.ids, tk.token_to_id(pad)) for e in encs]),
        "token_type_ids": torch.tensor([fill(e.type_ids, 0) for e in encs]),
        "attention_mask": torch.tensor([fill(e.attention_mask, 0) for e in encs]),
    }


def reference(model, tk, pad):
    encs, enc = encode_batch(tk, pad)
    base = model.base_model
    embeds = base.embeddings.word_embeddings(enc["input_ids"]).detach().requires_grad_(True)
    kwargs = dict(inputs_embeds=embeds, attention_mask=enc["attention_mask"], output_hidden_states=True)
    if model.config.model_type != "distilbert":
        kwargs["token_type_ids"] = enc["token_type_ids"]
    out = model(**kwargs)
    hidden = out.hidden_states[-1]
    mask = enc["attention_mask"].unsqueeze(-1).float()
    loss = (hidden[..., :4] * mask).sum() + (out.logits * torch.tensor(LOGIT_WEIGHTS)).sum()
    loss.backward()
    r = lambda t: [round(float(x), 7) for x in t]  # noqa: E731
    rows = []
    for i, ((text, pair), e) in enumerate(zip(BATCH, encs)):
        n = len(e.ids)
        rows.append(
            {
                "text": text,
                "text_pair": pair,
                "input_ids": e.ids,
                "token_type_ids": e.type_ids,
                "last_hidden_state": [r(v) for v in hidden[i, :n]],
                "logits": r(out.logits[i]),
                "embedding_grad": [r(v) for v in embeds.grad[i, :n]],
            }
        )
    return {
        "produced_by": f"torch {torch.__version__}, {type(model).__name__}, eval mode, fp32, "
        f"right padding to {enc['input_ids'].shape[1]} with attention_mask",
        "batch_padded_length": int(enc["input_ids"].shape[1]),
        "loss": "sum over real positions of last_hidden_state[..., :4] + sum of logits · logit_weights; "
        "embedding_grad is d loss / d inputs_embeds",
        "logit_weights": LOGIT_WEIGHTS,
        "loss_value": round(float(loss), 6),
        "rows": rows,
    }


def main():
    glue_dir, out_dir = sys.argv[1], sys.argv[2]
    corpus = glue_sentences(glue_dir)
    for i, (name, make) in enumerate(FAMILIES.items()):
        torch.manual_seed(SEED + i)
        tk, pad, model = make(corpus)
        randomise(model, SEED + i)
        model.eval()
        d = os.path.join(out_dir, name)
        os.makedirs(d, exist_ok=True)
        model.save_pretrained(d, safe_serialization=True)
        tk.save(os.path.join(d, "tokenizer.json"))
        with open(os.path.join(d, "reference.json"), "w") as f:
            json.dump(reference(model, tk, pad), f)
            f.write("\n")
        print("wrote", d)


if __name__ == "__main__":
    main()
