"""A MiniLM-sized sentence encoder for the benchmark (scripts/bench.py), with trained-BERT outliers planted.

`encoder()` is a transformers BertModel (6 layers, hidden 384, 12 heads, FFN 1536, vocab 30522:
the shape of all-MiniLM-L6-v2) with mean pooling over the attention mask, so its output is one
384-d sentence embedding per sequence. Weights are BERT's own random initialisation (std 0.02),
then what quantization meets in trained BERTs is planted (seeded, deterministic):

1. Outlier dimensions of the residual stream (Kovaleva et al. 2021, "BERT Busters"; Wei et al.
   2022, "Outlier Suppression"): trained BERTs have a couple of hidden dimensions (308 and 381 of
   768 in BERT-base) where every LayerNorm's gamma and beta are far larger than elsewhere, so the
   LayerNorm outputs -- the inputs of Q/K/V and of the FFN's first Linear -- carry a few channels
   an order of magnitude above the rest (values "close to 100" are reported). Planted:
   OUTLIER_DIMS (2 of 384) get gamma OUTLIER_GAMMA and beta +-OUTLIER_BETA in every LayerNorm
   (embeddings, attention output, FFN output); every other channel gets gamma uniform in 0.6-1.4
   and beta in +-0.1.
2. Outliers larger on delimiter tokens (Bondarenko et al. 2021, "Understanding and Overcoming the
   Challenges of Efficient Transformer Quantization"): the [CLS]/[SEP] word embeddings get
   +-DELIMITER_BOOST in the outlier dimensions.
3. A few large GELU outputs (the FFN's second Linear has the widest input range, Bondarenko et
   al.): in every layer GELU_NEURONS of the 1536 FFN neurons (a different random set per layer)
   get their fc1 rows scaled by GELU_SCALE and their bias raised by GELU_BIAS.

What this gives (`activation_ranges()`, 64 held-out sequences, worst layer; bench.py records it):
Q/K/V and fc1 inputs reach |x| ~59 in the outlier channels against a 99th percentile of ~6.5 over
the other channels (9x); fc2 inputs ~28 in the planted neurons against ~3.6 (8x). Like raw BERT's
"rogue dimensions" (Timkey & van Schijndel 2021), the two outlier dimensions also dominate the
mean-pooled embedding (~95 % of its squared norm), so a plain cosine mostly compares those two
numbers; bench.py therefore also reports the cosine of per-dimension standardized embeddings.

Token data (`calibration`, `held_out`) is made here with numpy: Zipf-distributed word-piece ids
(exponent 1, as word frequencies), [CLS] ... [SEP] then [PAD], lengths log-normal around 32
tokens clipped to 8..128, so most rows are padded and a few fill all 128 positions.
"""

from __future__ import annotations

import numpy as np
import torch

SEQ = 128
VOCAB = 30522
PAD, CLS, SEP, FIRST_WORD = 0, 101, 102, 999
OUTLIER_DIMS = (77, 308)
OUTLIER_GAMMA = 3.0
OUTLIER_BETA = 1.5
DELIMITER_BOOST = 0.5
GELU_NEURONS = 6
GELU_SCALE = 8.0
GELU_BIAS = 4.0


def config():
    from transformers import BertConfig

    return BertConfig(
        vocab_size=VOCAB,
        hidden_size=384,
        num_hidden_layers=6,
        num_attention_heads=12,
        intermediate_size=1536,
        max_position_embeddings=512,
        hidden_act="gelu",
    )


def encoder(seed: int = 0):
    """MiniLM-sized BertModel + mean pooling, planted outliers, eval mode."""
    from transformers import BertModel

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = MeanPooled(BertModel(config(), add_pooling_layer=False))
    plant_outliers(model.bert, torch.Generator().manual_seed(seed + 1))
    return model.eval()


class MeanPooled(torch.nn.Module):
    """BertModel's last hidden state averaged over the attended tokens (sentence-transformers pooling)."""

    def __init__(self, bert: torch.nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids, attention_mask):
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def plant_outliers(bert, g) -> None:
    """Plant (1)-(3) of the module docstring into a transformers BertModel, in place."""

    dims = list(OUTLIER_DIMS)
    signs = torch.tensor([1.0 if i % 2 == 0 else -1.0 for i in range(len(dims))])
    with torch.no_grad():
        for m in bert.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.copy_(torch.empty(m.weight.shape).uniform_(0.6, 1.4, generator=g))
                m.bias.copy_(torch.empty(m.bias.shape).uniform_(-0.1, 0.1, generator=g))
                m.weight[dims] = OUTLIER_GAMMA
                m.bias[dims] = OUTLIER_BETA * signs
        words = bert.embeddings.word_embeddings.weight
        for token in (CLS, SEP):
            words[token, dims] += DELIMITER_BOOST * signs
        for layer in bert.encoder.layer:
            fc1 = layer.intermediate.dense
            neurons = torch.randperm(fc1.out_features, generator=g)[:GELU_NEURONS]
            fc1.weight[neurons] *= GELU_SCALE
            fc1.bias[neurons] += GELU_BIAS


def tokens(count: int, seed: int) -> dict[str, np.ndarray]:
    """{"input_ids", "attention_mask"} (count, SEQ) int64: [CLS] Zipf word pieces [SEP] [PAD]..."""
    rng = np.random.default_rng(seed)
    words = np.arange(FIRST_WORD + 1, VOCAB)
    ranking = np.random.default_rng(1234).permutation(words)  # which id is frequent: fixed across sets
    p = 1.0 / np.arange(1, len(words) + 1)
    ids = np.full((count, SEQ), PAD, np.int64)
    mask = np.zeros((count, SEQ), np.int64)
    lengths = np.clip(np.round(np.exp(rng.normal(np.log(32), 0.6, count))), 8, SEQ).astype(int)
    for row, length in enumerate(lengths):
        ids[row, 0], ids[row, length - 1] = CLS, SEP
        ids[row, 1 : length - 1] = rng.choice(ranking, length - 2, p=p / p.sum())
        mask[row, :length] = 1
    return {"input_ids": ids, "attention_mask": mask}


def calibration(batches: int = 8, batch_size: int = 16, seed: int = 0):
    """Calibration batches of token sequences (128 in all by default)."""
    data = tokens(batches * batch_size, seed)
    for i in range(batches):
        yield {k: v[i * batch_size : (i + 1) * batch_size] for k, v in data.items()}


def held_out(count: int = 256, seed: int = 1) -> dict[str, np.ndarray]:
    """Sequences the calibration never saw, for the cosine figures."""
    return tokens(count, seed)


def activation_ranges(model, batch: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Per Linear role, max |input| over the OUTLIER/other channels (residual-stream inputs) or over
    the top GELU_NEURONS/other channels (FFN down-projection input), on `batch`, maximum over layers;
    and how much of the sentence embedding's squared norm the outlier dimensions hold (median)."""

    seen: dict[str, list[torch.Tensor]] = {"qkv_input": [], "fc1_input": [], "fc2_input": []}
    hooks = []
    for layer in model.bert.encoder.layer:
        for role, linear in (
            ("qkv_input", layer.attention.self.query),
            ("fc1_input", layer.intermediate.dense),
            ("fc2_input", layer.output.dense),
        ):
            hooks.append(
                linear.register_forward_pre_hook(
                    lambda _m, args, role=role: seen[role].append(args[0].detach().abs().amax(dim=(0, 1)))
                )
            )
    with torch.no_grad():
        embedding = model(**{k: torch.from_numpy(v) for k, v in batch.items()})
    for h in hooks:
        h.remove()
    ranges = {
        role: _worst(_split_ranges(channel_max, role) for channel_max in per_layer) for role, per_layer in seen.items()
    }
    share = embedding[:, list(OUTLIER_DIMS)].square().sum(1) / embedding.square().sum(1)
    return {**ranges, "embedding": {"outlier_dims_share_of_norm2_median": round(float(share.median()), 3)}}


def _split_ranges(channel_max: torch.Tensor, role: str) -> dict[str, float]:
    """One layer's max |x|: the planted channels vs the rest (max and 99th percentile over channels)."""
    top = channel_max.topk(GELU_NEURONS).indices if role == "fc2_input" else torch.tensor(OUTLIER_DIMS)
    rest = torch.ones(channel_max.numel(), dtype=torch.bool)
    rest[top] = False
    other = channel_max[rest]
    return {
        "outlier_max": float(channel_max[top].max()),
        "other_max": float(other.max()),
        "other_p99": float(other.quantile(0.99)),
    }


def _worst(layers) -> dict[str, float]:
    layers = list(layers)
    return {key: round(max(layer[key] for layer in layers), 2) for key in layers[0]}
