"""Weight-only quantization on a captured graph, in process: which linears get which setting, what the
collectors accumulate, and the converted module computing exactly the quantized weights (GPTQ, AWQ's input
scales), with excluded layers left float."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from quantcli.errors import RecipeError
from quantcli.recipe import QuantizationSection
from quantcli.weightonly import apply, collect, plan, prepare
from quantcli.weightonly.awq import awq
from quantcli.weightonly.gptq import gptq
from quantcli.weightonly.grid import Grid
from quantcli.weightonly.rtn import rtn


class Attention(nn.Module):
    """q, k and v read one input (one collector for the three); out reads their concatenation."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(80, 32), nn.Linear(80, 32), nn.Linear(80, 32, bias=False)
        self.out = nn.Linear(96, 16)

    def forward(self, x):
        return self.out(torch.cat([self.q(x), self.k(x), self.v(x)], -1))


SECTION = {
    "activations": "none",
    "weights": {"dtype": "int4", "block_size": 32, "method": "gptq"},
    "exclude_names": ["v"],
    "overrides": [{"names": ["out"], "weights": {"dtype": "int4", "block_size": 32, "method": "awq"}}],
}


def captured() -> torch.fx.GraphModule:
    torch.manual_seed(0)
    model = Attention().eval()
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    args = (torch.randn(2, 5, 80),)
    return torch.export.export(model, args, dynamic_shapes=({0: batch, 1: seq},)).module()


def batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    mixing = torch.randn(80, 80, generator=g) * 0.3 + torch.eye(80)
    return [torch.randn(4, 6, 80, generator=g) @ mixing for _ in range(3)]


def test_the_plan_follows_exclude_lists_and_overrides():
    q = QuantizationSection.model_validate(SECTION)
    layers = plan.layers(captured(), q)
    assert [(layer.module, layer.weights.method) for layer in layers] == [("q", "gptq"), ("k", "gptq"), ("out", "awq")]
    with pytest.raises(RecipeError, match="exclude_names.0. 'vv'"):
        plan.layers(captured(), QuantizationSection.model_validate({**SECTION, "exclude_names": ["vv"]}))


def test_collectors_accumulate_each_input_and_convert_quantizes_with_what_they_saw():
    q = QuantizationSection.model_validate(SECTION)
    module = prepare(captured(), q)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    assert sorted(k for k in before if k.startswith(collect.PREFIX)) == [
        f"{collect.PREFIX}{i}.{b}" for i in (0, 1) for b in ("abs_sum", "hessian", "rows")
    ]  # one for q and k's shared input, one for out's; none for the excluded v
    data = batches()
    with torch.no_grad():
        expected_float = [module(x) for x in data]  # collectors pass their input through unchanged
    rows = torch.cat([x.reshape(-1, 80) for x in data])
    stats = module.get_submodule(f"{collect.PREFIX}0")
    assert int(stats.rows) == rows.shape[0] and torch.allclose(stats.hessian, rows.T @ rows, rtol=1e-5, atol=1e-3)
    assert collect.summary(module) == {"inputs": 2, "rows": rows.shape[0]}

    # a new process: prepare again and load the state strictly
    restored = prepare(captured(), q)
    restored.load_state_dict(module.state_dict(), strict=True)
    records, codes = apply.convert(restored, q)
    assert [(r["module"], r["method"]) for r in records] == [("q", "gptq"), ("k", "gptq"), ("out", "awq")]
    assert not any(name.startswith(collect.PREFIX) for name, _ in restored.named_children())

    float_model = captured()
    x = data[0]
    with torch.no_grad():
        q_hat = gptq(float_model.q.weight, stats.hessian, Grid(4, True, 32)).weight()
        assert torch.equal(restored.q.weight, q_hat) and torch.equal(restored.v.weight, float_model.v.weight)
        assert torch.equal(codes["0.codes"], gptq(float_model.q.weight, stats.hessian, Grid(4, True, 32)).codes)
        hidden = torch.cat([x @ q_hat.T + float_model.q.bias, x @ restored.k.weight.T + float_model.k.bias], -1)
        hidden = torch.cat([hidden, x @ float_model.v.weight.T], -1)
        out_stats = module.get_submodule(f"{collect.PREFIX}1")
        grid = [Grid(4, True, 32)]
        # its input a concatenation: no op to fold a scale into, so AWQ's clip search alone (no input scale)
        (result,), alpha = awq([float_model.out.weight], out_stats.hessian, out_stats.magnitude(), grid, False)
        assert alpha == records[2]["alpha"] == 0 and result.input_scale is None
        assert awq([float_model.out.weight], out_stats.hessian, out_stats.magnitude(), grid)[1] > 0  # it would scale
        want = hidden @ result.weight().T + float_model.out.bias
        got = restored(x)
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.nn.functional.mse_loss(got, expected_float[0]) < 0.01 * expected_float[0].pow(2).mean()


class TinyLM(nn.Module):
    """A token table tied to the LM head, a position table of its own, one projection between them."""

    def __init__(self):
        super().__init__()
        self.embed, self.pos = nn.Embedding(40, 64), nn.Embedding(16, 64)
        self.proj, self.head = nn.Linear(64, 64), nn.Linear(64, 40, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(self.proj(self.embed(ids) + self.pos(ids % 16)))


def test_embeddings_read_their_tied_heads_quantized_weight_or_their_own_rounded_table():
    torch.manual_seed(0)
    ids = torch.randint(0, 40, (4, 12))
    program = torch.export.export(TinyLM().eval(), (ids,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    section = {"activations": "none", "weights": {"dtype": "int4", "block_size": 32, "method": "awq"}}
    q = QuantizationSection.model_validate(section)
    module, float_model = prepare(program.module(), q), program.module()
    with torch.no_grad():
        module(ids)
        records, codes = apply.convert(module, q)
        assert [(r["kind"], r["module"], r.get("tied_to")) for r in records] == [
            ("linear", "proj", None),
            ("linear", "head", None),
            ("embedding", "embed", 1),  # the head's codes: no table of its own
            ("embedding", "pos", None),
        ]
        assert [r["method"] for r in records] == ["awq", "awq", "awq", "rtn"]
        assert sorted(codes) == [f"{i}.{part}" for i in (0, 1, 3) for part in ("codes", "scale")]
        loaded = apply.load(records, codes)
        head, pos = loaded[1][1].weight(), loaded[3][1].weight()
        assert torch.equal(pos, rtn(float_model.pos.weight, Grid(4, True, 32)).weight())
        s_head = getattr(module, f"{apply.INPUT_SCALE}1")  # AWQ scaled the head's input channels: it holds W * s
        s_proj = getattr(module, f"{apply.INPUT_SCALE}0", torch.ones(64))
        x = ids[:1]
        hidden = head[x] / s_head + pos[x % 16]  # the tied table's rows divided by the head's scales
        # the head's 1 / s folded into proj's rows (proj quantized after): its bias shows it
        assert records[1]["input_scale"] == {"folded_into": ["proj.weight", "proj.bias"]}
        assert torch.allclose(module.proj.bias * s_head, float_model.proj.bias, rtol=1e-5, atol=1e-6)
        want = ((hidden / s_proj) @ module.proj.weight.T + module.proj.bias) @ head.T
        assert torch.allclose(module(x), want, atol=1e-4)
    read = {n.target for n in module.graph.nodes if n.op == "get_attr" and n.users}
    assert "head.weight" not in read and "pos.weight" in read  # the tied float table is read no more

    per_channel = QuantizationSection.model_validate({"activations": "none", "weights": {"dtype": "int8"}})
    records, _ = apply.convert(prepare(program.module(), per_channel), per_channel)
    assert [r["kind"] for r in records] == ["linear", "linear"]  # GatherBlockQuantized needs blocks: tables float
    rtn_section = {**section, "weights": {**section["weights"], "method": "rtn"}, "exclude_names": ["pos"]}
    excluded = QuantizationSection.model_validate(rtn_section)
    records, _ = apply.convert(prepare(program.module(), excluded), excluded)
    assert [(r["module"], r.get("tied_to")) for r in records] == [("proj", None), ("head", None), ("embed", 1)]


def test_a_conv1d_weight_stored_k_by_n_is_quantized_as_its_transpose_and_stored_back_k_by_n():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    layer = Conv1D(48, 80).eval()  # GPT-2's: addmm(bias, x, weight [K=80, N=48])
    dims = {0: torch.export.Dim("b"), 1: torch.export.Dim("s")}
    program = torch.export.export(layer, (torch.randn(2, 5, 80),), dynamic_shapes=(dims,))
    q = QuantizationSection.model_validate({**SECTION, "exclude_names": [], "overrides": []})
    module = prepare(program.module(), q)
    x = batches()[0]
    with torch.no_grad():
        module(x)
        hessian = module.get_submodule(f"{collect.PREFIX}0").hessian
        rows = x.reshape(-1, 80)
        assert torch.allclose(hessian, rows.T @ rows, rtol=1e-5, atol=1e-3)  # the Conv1D's input, not its bias
        records, codes = apply.convert(module, q)
        expected = gptq(layer.weight.T, hessian, Grid(4, True, 32))
        assert records[0]["shape"] == [48, 80] and torch.equal(codes["0.codes"], expected.codes)
        assert torch.equal(module.weight, expected.weight().T)  # stored back as the layer stores it
        assert torch.allclose(module(x), x @ expected.weight().T + layer.bias, atol=1e-5)


class Norms(nn.Module):
    """What AWQ's input scales fold into: an RMS norm's weight read by q, k and v (`mul(weight, h)`, as Hugging
        Face Llama's), a LayerNorm read by a GPT-2 Conv1D (through its view), and an RMS norm whose output a residual
        reads besides gate and up (nothing to fold into: one Div for the two), and down reading silu(gate) * up (its
    scale folds into up's rows)."""

    def __init__(self):
        from transformers.pytorch_utils import Conv1D

        super().__init__()
        self.attn_norm, self.mlp_norm = nn.Parameter(torch.rand(80) + 0.5), nn.Parameter(torch.rand(48) + 0.5)
        with torch.no_grad():
            self.attn_norm[::9] *= 20  # the large channels of a trained LLM's norms
            self.mlp_norm[[3, 17, 40]] *= 20
        self.q, self.k, self.v = nn.Linear(80, 32), nn.Linear(80, 32), nn.Linear(80, 32, bias=False)
        self.ln, self.fc = nn.LayerNorm(96), Conv1D(48, 96)
        with torch.no_grad():
            self.ln.weight[::5] *= 20
            self.ln.bias.uniform_(-1, 1)
        self.gate, self.up, self.down = nn.Linear(48, 64), nn.Linear(48, 64), nn.Linear(64, 48)

    def forward(self, x):
        h = self.attn_norm * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
        y = self.fc(self.ln(torch.cat([self.q(h), self.k(h), self.v(h)], -1)))
        m = self.mlp_norm * (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-6))
        return torch.cat([self.down(torch.nn.functional.silu(self.gate(m)) * self.up(m)), m], -1)


def test_awq_folds_each_inputs_scale_into_the_norm_before_it_and_scales_no_other_input():
    torch.manual_seed(0)
    float_model = Norms().eval()
    dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("seq")}
    program = torch.export.export(float_model, (batches()[0],), dynamic_shapes=(dims,))
    section = {"activations": "none", "weights": {"dtype": "int4", "block_size": 32, "method": "awq"}}
    q = QuantizationSection.model_validate(section)
    module = prepare(program.module(), q)
    with torch.no_grad():
        for x in batches():
            module(x)
        records, codes = apply.convert(module, q)
    scaling = {r["module"]: r.get("input_scale") for r in records}
    assert scaling == {
        **{name: {"folded_into": ["attn_norm"]} for name in ("q", "k", "v")},
        "fc": {"folded_into": ["ln.weight", "ln.bias"]},
        **{name: None for name in ("gate", "up")},  # the concat reads their input too: no fold, no scale
        "down": {"folded_into": ["up.weight", "up.bias"]},
    }
    assert len({r["alpha"] for r in records if r["module"] in "qkv"}) == 1  # one alpha, one scale for the three
    assert [r["alpha"] for r in records if r["module"] in ("gate", "up")] == [0.0, 0.0]  # the clip search alone
    assert not [n for n in module.graph.nodes if n.target == torch.ops.aten.div.Tensor]  # no Div in front of any

    # the Div form: the float model reading the quantized weights, each linear's input divided by its scales
    s_attn = float_model.attn_norm / module.attn_norm
    s_ln = float_model.ln.weight / module.ln.weight
    assert torch.allclose(module.ln.bias * s_ln, float_model.ln.bias, rtol=1e-5, atol=1e-6)  # bias / s too
    scales = {"q": s_attn, "k": s_attn, "v": s_attn, "fc": s_ln, "gate": torch.ones(48), "up": torch.ones(48)}
    scales["down"] = float_model.up.bias / module.up.bias  # up's rows hold 1 / s: its bias shows s
    assert all(bool((scales[name] != 1).any()) for name in ("q", "fc", "down"))
    divided = Norms().eval()
    divided.load_state_dict(float_model.state_dict())
    for (_, result), name in zip(apply.load(records, codes), scaling):
        layer = getattr(divided, name)
        layer.weight.data = result.weight().T.contiguous() if name == "fc" else result.weight()
        layer.register_forward_pre_hook(lambda _, args, s=scales[name]: (args[0] / s,))
    divided.up.weight.data *= scales["down"][:, None]  # up's codes as convert made them, its rows' 1 / s undone
    with torch.no_grad():
        for x in batches():
            want, got = divided(x), module(x)
            assert torch.allclose(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


def test_a_tied_heads_scale_folds_into_the_final_norm_and_the_embedding_still_divides_its_rows():
    class NormedLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.proj = nn.Embedding(40, 64), nn.Linear(64, 64)
            self.norm = nn.Parameter(torch.rand(64) + 0.5)
            with torch.no_grad():
                self.norm[::8] *= 20
            self.head = nn.Linear(64, 40, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, ids):
            h = self.proj(self.embed(ids))
            return self.head(self.norm * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)))

    torch.manual_seed(0)
    float_model = NormedLM().eval()
    ids = torch.randint(0, 40, (4, 12))
    program = torch.export.export(float_model, (ids,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    section = {"activations": "none", "weights": {"dtype": "int4", "block_size": 32, "method": "awq"}}
    q = QuantizationSection.model_validate(section)
    module = prepare(program.module(), q)
    with torch.no_grad():
        module(ids)
        records, codes = apply.convert(module, q)
        assert [(r["module"], r.get("input_scale"), r.get("tied_to")) for r in records] == [
            ("proj", None, None),  # its input the embedding's rows: nothing to fold into, no scale
            ("head", {"folded_into": ["norm"]}, None),
            ("embed", None, 1),
        ]
        head = apply.load(records, codes)[1][1].weight()  # Q(W s): the table both read
        s_head = float_model.norm / module.norm
        assert torch.allclose(getattr(module, f"{apply.INPUT_SCALE}1"), s_head, rtol=1e-6)  # the rows' divisor
        assert not hasattr(module, f"{apply.INPUT_SCALE}0")
        h = (head[ids] / s_head) @ module.proj.weight.T + float_model.proj.bias
        want = ((float_model.norm * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6))) / s_head) @ head.T
        assert torch.allclose(module(ids), want, atol=1e-4)
