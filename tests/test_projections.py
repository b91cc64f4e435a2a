"""Every decoder family: the projection map finds exactly the expected linear inputs (fused slices, Conv1D,
experts), spectra / allocation / budget / perplexity work on each, fused slices mean what their names say,
and nothing is dropped silently."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from acttail_core import decode
from acttail_core.allocation import AllocationSettings, allocate, allocate_sparsities, uniform_budget
from acttail_core.budget import load_budget, make_budget, save_budget
from acttail_core.corpora import tokenize_corpus
from acttail_core.errors import ActTailError
from acttail_core.evaluate import perplexity
from acttail_core.models import from_module
from acttail_core.projection_map import FAMILY_MAPS, split_falcon_qkv, split_qkv_per_head
from acttail_core.projections import find_projections, projection_coverage, weight_of
from acttail_core.sparsify import sparsify
from acttail_core.spectra import compute_spectra
from tests.conftest import TINY_FAMILIES, byte_tokenizer, make_tiny_family

TEXT = " ".join(f"the {w} went to the market and bought {n} apples" for n, w in enumerate(["cat", "dog", "owl"] * 40))

LLAMA_LAYER = [("self_attn.q_proj", "q", 32, 32), ("self_attn.k_proj", "k", 16, 32), ("self_attn.v_proj", "v", 16, 32),
               ("self_attn.o_proj", "o", 32, 32), ("mlp.gate_proj", "gate", 64, 32), ("mlp.up_proj", "up", 64, 32),
               ("mlp.down_proj", "down", 32, 64)]


def _experts(size: int) -> list[tuple[str, str, int, int]]:
    return [(f"mlp.experts.{e}.{t}", t, *shape) for e in range(4)
            for t, shape in (("gate", (size, 32)), ("up", (size, 32)), ("down", (32, size)))]


# family -> (decoder layers' prefix, [(name inside the layer, type, out, in)] for every layer)
EXPECTED = {
    **{family: ("model.layers", LLAMA_LAYER) for family in ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")},
    "phi3": ("model.layers", [
        ("self_attn.qkv_proj.q", "q", 32, 32), ("self_attn.qkv_proj.k", "k", 16, 32),
        ("self_attn.qkv_proj.v", "v", 16, 32), ("self_attn.o_proj", "o", 32, 32),
        ("mlp.gate_up_proj.gate", "gate", 64, 32), ("mlp.gate_up_proj.up", "up", 64, 32),
        ("mlp.down_proj", "down", 32, 64)]),
    "opt": ("model.decoder.layers", [
        ("self_attn.q_proj", "q", 32, 32), ("self_attn.k_proj", "k", 32, 32), ("self_attn.v_proj", "v", 32, 32),
        ("self_attn.out_proj", "o", 32, 32), ("fc1", "up", 64, 32), ("fc2", "down", 32, 64)]),
    "gpt2": ("transformer.h", [
        ("attn.c_attn.q", "q", 32, 32), ("attn.c_attn.k", "k", 32, 32), ("attn.c_attn.v", "v", 32, 32),
        ("attn.c_proj", "o", 32, 32), ("mlp.c_fc", "up", 64, 32), ("mlp.c_proj", "down", 32, 64)]),
    "gpt_neox": ("gpt_neox.layers", [
        ("attention.query_key_value.q", "q", 32, 32), ("attention.query_key_value.k", "k", 32, 32),
        ("attention.query_key_value.v", "v", 32, 32), ("attention.dense", "o", 32, 32),
        ("mlp.dense_h_to_4h", "up", 64, 32), ("mlp.dense_4h_to_h", "down", 32, 64)]),
    "falcon": ("transformer.h", [
        ("self_attention.query_key_value.q", "q", 32, 32), ("self_attention.query_key_value.k", "k", 8, 32),
        ("self_attention.query_key_value.v", "v", 8, 32), ("self_attention.dense", "o", 32, 32),
        ("mlp.dense_h_to_4h", "up", 128, 32), ("mlp.dense_4h_to_h", "down", 32, 128)]),
    "mixtral": ("model.layers", LLAMA_LAYER[:4] + _experts(64)),
    "qwen2_moe": ("model.layers", LLAMA_LAYER[:4] + _experts(48) + [
        ("mlp.shared_expert.gate_proj", "shared_gate", 64, 32), ("mlp.shared_expert.up_proj", "shared_up", 64, 32),
        ("mlp.shared_expert.down_proj", "shared_down", 32, 64)]),
}
FUSED = {  # case -> (family, config overrides): models with a fused attention module
    "phi3": ("phi3", {}), "gpt2": ("gpt2", {}), "gpt_neox": ("gpt_neox", {}), "falcon": ("falcon", {}),
    "falcon-per-head": ("falcon", {"multi_query": False}),
    "falcon-grouped": ("falcon", {"new_decoder_architecture": True, "num_kv_heads": 2}),
}


def loaded_family(family: str, **overrides):
    return from_module(make_tiny_family(family, **overrides), byte_tokenizer(), name=f"tiny-{family}")


def layer_projections(projections, layer: int):
    return [p for p in projections if p.layer == layer]


@pytest.mark.parametrize("family", sorted(TINY_FAMILIES))
def test_exactly_the_expected_projections(family) -> None:
    assert set(EXPECTED) == set(TINY_FAMILIES)
    model = make_tiny_family(family)
    prefix, expected = EXPECTED[family]
    projections = find_projections(model)
    for layer in (0, 1):
        found = [(p.name, p.type, p.out_features, p.in_features) for p in layer_projections(projections, layer)]
        assert found == [(f"{prefix}.{layer}.{name}", t, o, i) for name, t, o, i in expected]
    for p in projections:
        assert tuple(weight_of(model, p).shape) == p.shape
    # Nothing dropped: every weight matrix inside the decoder layers (but routers) is covered row for row
    covered: dict[str, int] = {}
    for p in projections:
        covered[p.module_name] = covered.get(p.module_name, 0) + p.params
    routers = {"mlp.gate", "mlp.shared_expert_gate"}
    for name, param in model.named_parameters():
        module = name.rsplit(".", 1)[0]
        if name.startswith(prefix) and param.dim() >= 2 and module.split(".", 3)[-1] not in routers:
            assert covered.get(module, 0) >= param.numel() or module.endswith("experts"), name
    experts = [m for n, m in model.named_modules() if n.endswith("mlp.experts")]
    assert sum(covered.get(n, 0) for n, _ in model.named_modules() if n.endswith("mlp.experts")) == sum(
        m.gate_up_proj.numel() + m.down_proj.numel() for m in experts)
    assert projection_coverage(model).mapped
    # Every module that holds a projection is called by the forward (where the masks act), none only read from
    assert {p.module_name for p in projections} <= called_modules(model, torch.arange(40)[None] + 40)


@pytest.mark.parametrize("family", sorted(TINY_FAMILIES))
def test_spectra_allocation_budget_and_zero_budget_perplexity(family, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("ACTTAIL_CACHE", str(tmp_path / "cache"))
    loaded = loaded_family(family)
    model = loaded.model
    spectra = compute_spectra(loaded)
    projections = find_projections(model)
    assert spectra.projections() == projections
    monkeypatch.setattr("acttail_core.spectra.compute_eigenvalues", lambda *a, **k: pytest.fail("cache missed"))
    assert compute_spectra(loaded).alphas().tolist() == spectra.alphas().tolist()  # read back from the cache
    for entry, p in zip(spectra.entries, projections):  # eigenvalues of the projection's own [out, in] matrix
        w = weight_of(model, p).double()
        expected = torch.linalg.eigvalsh(w.T @ w if w.shape[0] >= w.shape[1] else w @ w.T).numpy()
        np.testing.assert_allclose(entry.eigenvalues, expected.astype(np.float32), rtol=1e-5, atol=1e-6)
    budget = allocate(spectra, 0.5, AllocationSettings())
    assert len(budget.projections) == len(projections) and abs(budget.effective_sparsity - 0.5) < 1e-9
    reread = load_budget(save_budget(budget, tmp_path / "budget.json"), projections, loaded.fingerprint)
    assert reread == budget
    chunks = tokenize_corpus(loaded, TEXT, seqlen=48, max_tokens=96)
    dense = perplexity(loaded, chunks)
    zero = perplexity(loaded, chunks, uniform_budget(projections, 0.0, loaded.name, loaded.fingerprint))
    assert zero.ppl == dense.ppl and zero.nll == dense.nll
    sparse = perplexity(loaded, chunks, budget)
    assert sparse.ppl != dense.ppl and abs(sparse.realized_sparsity - 0.5) < 0.03  # keep counts round on 32 inputs
    assert set(sparse.per_projection) == {p.name for p in projections}  # every expert saw tokens here
    for entry in budget.projections:  # ties at the k-th magnitude keep a few extra; ReLU (OPT fc2) adds zeros
        assert sparse.per_projection[entry.name] >= 1 - entry.keep / entry.in_features - 0.02
    with torch.no_grad():
        assert perplexity(loaded, chunks).nll == dense.nll  # nothing left behind


def topk_reference(x: torch.Tensor, keep: int) -> torch.Tensor:
    kth = x.abs().topk(keep, dim=-1).values[..., -1:]
    return x * (x.abs() >= kth)


def acttail_like(loaded, sparsity: float, seed: int = 0):
    """A non-uniform budget, so the slices of one fused module (and every expert) get different keep counts."""
    projections = find_projections(loaded.model)
    alphas = np.random.default_rng(seed).uniform(2, 8, len(projections))
    return make_budget(projections, allocate_sparsities(alphas, projections, sparsity), model_name=loaded.name,
                       model_fingerprint=loaded.fingerprint, method="acttail", target_sparsity=sparsity, alphas=alphas)


@pytest.mark.parametrize("case", sorted(FUSED))
def test_each_slice_of_a_fused_module_gets_its_own_mask(case) -> None:
    family, overrides = FUSED[case]
    loaded = loaded_family(family, **overrides)
    model = loaded.model
    budget = acttail_like(loaded, 0.6)
    keep = budget.keep_by_name()
    attention = next(p for p in find_projections(model) if p.layer == 1 and p.type == "q").module_name
    parts = [p for p in find_projections(model) if p.module_name == attention]
    assert [p.type for p in parts] == ["q", "k", "v"] and len({keep[p.name] for p in parts}) > 1
    module = model.get_submodule(attention)
    seen: dict = {}
    module.register_forward_pre_hook(lambda m, args: seen.__setitem__("x", args[0].detach().clone()))
    ids = tokenize_corpus(loaded, TEXT, seqlen=40, max_tokens=40)
    with torch.no_grad(), sparsify(model, budget) as stats:
        handle = module.register_forward_hook(lambda m, args, out: seen.__setitem__("out", out.detach().clone()))
        model(ids)
        handle.remove()
    bias = getattr(module, "bias", None)
    for p in parts:
        rows = torch.cat([torch.arange(a, b, s) for a, b, s in p.rows])
        expected = F.linear(topk_reference(seen["x"], keep[p.name]), weight_of(model, p),
                            None if bias is None else bias[rows])
        torch.testing.assert_close(seen["out"][..., rows], expected, rtol=1e-5, atol=1e-6)
        assert stats.per_projection()[p.name] == pytest.approx(1 - keep[p.name] / p.in_features, abs=1e-9)


@pytest.mark.parametrize("case", sorted(FUSED))
def test_fused_slices_are_what_their_names_say(case) -> None:
    """Zeroing the rows called v silences attention (o's input is exactly 0); zeroing the rows called q, or
    those called k, both give uniform attention (every score 0), and the same o input."""
    family, overrides = FUSED[case]
    ids = torch.arange(20)[None] + 40

    def o_input_with_zeroed(proj_type: str) -> torch.Tensor:
        model = make_tiny_family(family, **overrides)
        projections = find_projections(model)
        target = next(p for p in projections if p.layer == 0 and p.type == proj_type)
        o = next(p for p in projections if p.layer == 0 and p.type == "o")
        module = model.get_submodule(target.module_name)
        weight = module.weight.T if target.transposed else module.weight
        bias = getattr(module, "bias", None)
        for start, stop, step in target.rows:
            weight[start:stop:step] = 0
            if bias is not None:
                bias[start:stop:step] = 0
        seen = {}
        model.get_submodule(o.module_name).register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0]))
        with torch.no_grad():
            model(ids)
        return seen["x"]

    assert o_input_with_zeroed("v").abs().max() == 0
    by_q, by_k = o_input_with_zeroed("q"), o_input_with_zeroed("k")
    assert by_q.abs().max() > 0
    torch.testing.assert_close(by_q, by_k, rtol=1e-5, atol=1e-6)


def test_split_layouts_follow_the_modeling_code() -> None:
    class NeoX:
        num_attention_heads, hidden_size = 2, 8

    # GPT-NeoX: qkv.view(..., heads, 3 * head_dim).chunk(3, -1)
    assert split_qkv_per_head(NeoX, 24) == {"q": ((0, 4, 1), (12, 16, 1)), "k": ((4, 8, 1), (16, 20, 1)),
                                            "v": ((8, 12, 1), (20, 24, 1))}

    class Falcon40B:
        num_attention_heads, hidden_size, num_kv_heads, new_decoder_architecture = 4, 8, 2, True

    # new decoder architecture: view(..., kv_heads, heads // kv_heads + 2, head_dim): [q, q, k, v] per group
    assert split_falcon_qkv(Falcon40B, 16) == {"q": ((0, 4, 1), (8, 12, 1)), "k": ((4, 6, 1), (12, 14, 1)),
                                               "v": ((6, 8, 1), (14, 16, 1))}


def test_every_expert_counts_in_the_weighted_mean_and_keeps_its_own_budget() -> None:
    loaded = loaded_family("mixtral")
    model = loaded.model
    budget = acttail_like(loaded, 0.5, seed=3)
    experts = [e for e in budget.projections if ".experts." in e.name]
    assert len(experts) == 2 * 4 * 3 and len({e.keep for e in experts if e.type == "down"}) > 1
    total = sum(p.numel() for n, p in model.named_parameters() if ".layers." in n and "norm" not in n
                and not n.endswith("mlp.gate.weight"))
    assert sum(e.params for e in budget.projections) == total  # every expert's full weight, visited or not
    ids = tokenize_corpus(loaded, TEXT, seqlen=64, max_tokens=128)
    with torch.no_grad(), sparsify(model, budget) as stats:
        model(ids)
    realized = stats.per_projection()
    assert {e.name for e in experts} <= set(realized)
    for e in experts:  # TopK keeps exactly keep entries of every routed token's input
        assert realized[e.name] == pytest.approx(1 - e.keep / e.in_features, abs=1e-9), e.name


def test_experts_are_masked_inside_their_computation() -> None:
    """The MoE block under a budget equals a plain per-expert computation with each expert's own masks."""
    loaded = loaded_family("mixtral")
    model = loaded.model
    budget = acttail_like(loaded, 0.6, seed=1)
    keep = budget.keep_by_name()
    block = model.model.layers[1].mlp
    seen: dict = {}
    block.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0].detach().clone()))
    ids = tokenize_corpus(loaded, TEXT, seqlen=48, max_tokens=48)
    with torch.no_grad(), sparsify(model, budget):
        handle = block.register_forward_hook(lambda m, a, out: seen.__setitem__("out", out.detach().clone()))
        model(ids)
        handle.remove()
    x = seen["x"].reshape(-1, 32)
    probs = torch.softmax(F.linear(x, block.gate.weight).float(), dim=-1)
    weights, chosen = probs.topk(2, dim=-1)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    experts = block.experts
    expected = torch.zeros_like(x)
    name = "model.layers.1.mlp.experts"
    for e in range(4):
        token, slot = torch.where(chosen == e)
        rows = x[token]
        gate = F.linear(topk_reference(rows, keep[f"{name}.{e}.gate"]), experts.gate_up_proj[e, :64])
        up = F.linear(topk_reference(rows, keep[f"{name}.{e}.up"]), experts.gate_up_proj[e, 64:])
        down = F.linear(topk_reference(experts.act_fn(gate) * up, keep[f"{name}.{e}.down"]), experts.down_proj[e])
        expected.index_add_(0, token, down * weights[token, slot, None])
    torch.testing.assert_close(seen["out"].reshape(-1, 32), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_zero_budget_is_bit_identical_and_the_experts_implementation_comes_back(family) -> None:
    loaded = loaded_family(family)
    model = loaded.model
    before = model.get_experts_implementation()
    assert before == {"": "grouped_mm"}  # transformers' default, which the masked implementation follows
    ids = tokenize_corpus(loaded, TEXT, seqlen=64, max_tokens=128)
    zero = uniform_budget(find_projections(model), 0.0, loaded.name, loaded.fingerprint)
    with torch.no_grad():
        dense = model(ids).logits
        with sparsify(model, zero) as stats:
            assert model.get_experts_implementation() == {"": "acttail"}
            inside = model(ids).logits
        assert torch.equal(inside, dense) and stats.overall() == 0.0
        assert model.get_experts_implementation() == before
        with pytest.raises(RuntimeError, match="boom"), sparsify(model, acttail_like(loaded, 0.5)):
            raise RuntimeError("boom")
        assert model.get_experts_implementation() == before
        assert torch.equal(model(ids).logits, dense)
        model.set_experts_implementation("eager")  # another implementation: equal within rounding, and restored
        with sparsify(model, zero):
            torch.testing.assert_close(model(ids).logits, dense, rtol=1e-5, atol=1e-6)
        assert model.get_experts_implementation() == {"": "eager"}


def unvisited_expert_mixtral():
    """Top-1 routing where expert 3 never wins: router rows u, v, -v, 0 (max(u.x, |v.x|) > 0 = expert 3's logit)."""
    model = make_tiny_family("mixtral", num_experts_per_tok=1)
    for layer in model.model.layers:
        router = layer.mlp.gate.weight
        router[2] = -router[1]
        router[3] = 0
    return from_module(model, byte_tokenizer(), name="tiny-mixtral-unvisited")


@pytest.mark.slow  # calibration and greedy curves end to end, seconds
def test_an_expert_no_token_visits(tmp_path, monkeypatch) -> None:
    from acttail_core import greedy
    from acttail_core.corpora import load_text
    from acttail_core.thresholds import ThresholdTable, calibrate_on_chunks

    monkeypatch.setenv("ACTTAIL_CACHE", str(tmp_path))
    loaded = unvisited_expert_mixtral()
    model = loaded.model
    ids = tokenize_corpus(loaded, TEXT, seqlen=64, max_tokens=128)
    projections = find_projections(model)
    budget = uniform_budget(projections, 0.5, loaded.name, loaded.fingerprint)
    with torch.no_grad(), sparsify(model, budget) as stats:
        model(ids)
    unvisited = {p.name for p in projections} - set(stats.per_projection())  # not measured, not in the realized mean
    assert {f"model.layers.{i}.mlp.experts.3.{t}" for i in (0, 1) for t in ("gate", "up", "down")} <= unvisited
    assert all(".experts." in n for n in unvisited) and stats.overall() == pytest.approx(0.5, abs=0.01)
    table = calibrate_on_chunks(model, ids)
    for name in table.names:  # threshold 0, the expert stays dense, exactly where no token came
        assert table.quantiles[table.names.index(name)].any() == (name not in unvisited)
    thresholds = ThresholdTable.bind(table, model).thresholds_for(budget)
    assert all((thresholds[p.name] == 0.0) == (p.name in unvisited) for p in projections)
    with torch.no_grad(), sparsify(model, budget, "threshold", thresholds) as stats:
        model(ids)
    assert stats.overall() == pytest.approx(0.5, abs=0.05)
    curves = greedy.measure_error_curves(loaded, tokens=64, use_cache=False)
    calibration = tokenize_corpus(loaded, load_text("demo", role="calibration"), seqlen=64, max_tokens=64)[:1]
    with torch.no_grad(), sparsify(model, None) as stats:  # the experts greedy's calibration text reached
        model(calibration)
    unvisited = {p.name for p in projections} - set(stats.per_projection())
    assert any(".experts.3." in n for n in unvisited)
    for i, p in enumerate(curves.projections):  # an unvisited expert's error curve: its visited peers' mean
        if p.name in unvisited:
            peers = [j for j, q in enumerate(curves.projections)
                     if q.layer == p.layer and q.type == p.type and q.name not in unvisited]
            np.testing.assert_allclose(curves.errors[i], curves.errors[peers].mean(axis=0))


def test_a_layer_the_map_does_not_match_is_an_error_naming_the_module() -> None:
    model = make_tiny_family("llama")
    model.model.layers[1].mlp.extra_proj = torch.nn.Linear(64, 64)
    with pytest.raises(ActTailError, match=r"model\.layers\.1\.mlp\.extra_proj: a linear layer that the llama "):
        find_projections(model)
    model = make_tiny_family("phi3")
    model.model.layers[0].mlp.gate_up_proj = torch.nn.Identity()
    with pytest.raises(ActTailError, match=r"model\.layers\.0\.mlp\.gate_up_proj: the phi3 projection map expects"):
        find_projections(model)


def test_unknown_family_takes_every_linear_layer_and_says_so() -> None:
    assert "starcoder2" not in FAMILY_MAPS
    model = make_tiny_family("starcoder2")
    projections = find_projections(model)
    assert [(p.name, p.type) for p in layer_projections(projections, 0)] == [
        (f"model.layers.0.{n}", n.split(".")[-1])
        for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.c_fc",
                  "mlp.c_proj")]
    coverage = projection_coverage(model)
    assert not coverage.mapped
    text = "\n".join(coverage.lines())
    assert "'starcoder2' is not in the projection map: every linear layer" in text
    assert "mlp.c_fc -> c_fc" in text and "skipped: lm_head (outside the decoder layers)" in text


def test_routers_are_reported_as_skipped() -> None:
    coverage = projection_coverage(make_tiny_family("qwen2_moe", mlp_only_layers=[1]))
    assert coverage.skipped == ("model.layers.*.mlp.gate (router)",
                                "model.layers.*.mlp.shared_expert_gate (shared-expert gate (a router))",
                                "lm_head (outside the decoder layers)")
    assert "mlp.experts -> gate, up, down of 4 experts" in coverage.taken
    assert "mlp.gate_proj -> gate" in coverage.taken  # layer 1 is a dense MLP layer: the second layout


@pytest.mark.parametrize("family", ["phi3", "gpt2", "gpt_neox", "falcon", "opt", "mixtral", "qwen2_moe"])
def test_sparse_decode_declines_fused_moe_and_conv1d_models(family) -> None:
    ok, why = decode.support(make_tiny_family(family))
    assert not ok and why


@pytest.mark.parametrize("family", ["gemma", "gemma2", "olmo", "olmo2", "olmo3", "cohere", "granite", "stablelm",
                                    "olmoe", "qwen3_moe"])
def test_other_mapped_families_match_their_map(family) -> None:
    extra = {"olmoe": dict(num_experts=4, num_experts_per_tok=2),
             "qwen3_moe": dict(num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48),
             "gemma": dict(num_key_value_heads=2, head_dim=8),
             "gemma2": dict(num_key_value_heads=2, head_dim=8)}.get(family, {})
    model = make_tiny_family(family, **extra)
    types = [p.type for p in layer_projections(find_projections(model), 0)]
    assert types[:4] == ["q", "k", "v", "o"]
    assert types[4:] == (["gate", "up", "down"] * (4 if "moe" in family else 1))


def test_vision_layers_as_long_as_the_text_layers_are_not_the_decoder() -> None:
    """Gemma 3 with its vision tower: both lists have 2 layers; the language model's are the decoder layers."""
    from transformers import AutoModelForCausalLM, Gemma3Config

    text = dict(vocab_size=259, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                head_dim=8, intermediate_size=64)
    vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32,
                  patch_size=8)
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4)
    model = AutoModelForCausalLM.from_config(config)
    projections = find_projections(model)
    assert {p.name.rsplit(".", 2)[0] for p in projections} == {"model.language_model.layers.0",
                                                               "model.language_model.layers.1"}
    assert [p.type for p in layer_projections(projections, 0)] == ["q", "k", "v", "o", "gate", "up", "down"]


def test_unmapped_families_skip_linear_routers() -> None:
    """AFMoE's router is an ``nn.Linear`` (``mlp.router.gate``): it picks experts, its input is no projection's."""
    model = tiny_moe("afmoe")
    assert not any(".router." in p.name for p in find_projections(model))
    assert "model.layers.*.mlp.router.gate (router)" in projection_coverage(model).skipped


def tiny_moe(family: str) -> torch.nn.Module:
    settings = {"llama4_text": dict(num_key_value_heads=2, head_dim=8, num_local_experts=4, intermediate_size_mlp=64),
                "afmoe": dict(num_key_value_heads=2, head_dim=8, num_experts=4, moe_intermediate_size=32,
                              num_dense_layers=1),
                "jetmoe": dict(num_local_experts=4, kv_channels=8)}[family]
    return make_tiny_family(family, **settings)


@pytest.mark.parametrize("family, module", [("llama4_text", "model.layers.0.feed_forward.experts"),
                                            ("jetmoe", "model.layers.0.mlp.input_linear")])
def test_experts_outside_the_experts_interface_are_an_error_naming_the_module(family, module) -> None:
    """Llama 4's and JetMoE's experts are 3-D parameters their own forward multiplies: read as transformers' fused
    experts they would be misread (Llama 4 stores them [in, out] without saying so) and never masked."""
    model = tiny_moe(family)
    with pytest.raises(ActTailError, match=rf"^{module}: \w+ holds expert weights .* this model family is not "):
        find_projections(model)


NEW_MAPS = {  # family -> (config overrides, types of layer 0, types of layer 1)
    "glm": ({}, ["q", "k", "v", "o", "gate", "up", "down"], None),
    "glm4": ({}, ["q", "k", "v", "o", "gate", "up", "down"], None),
    "gpt_oss": (dict(num_key_value_heads=2, head_dim=8, num_local_experts=4, layer_types=None),
                ["q", "k", "v", "o"] + ["gate", "up", "down"] * 4, None),
    "glm4_moe": (dict(num_key_value_heads=2, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                      first_k_dense_replace=1, n_group=1, topk_group=1), ["q", "k", "v", "o", "gate", "up", "down"],
                 ["q", "k", "v", "o"] + ["gate", "up", "down"] * 4 + ["shared_gate", "shared_up", "shared_down"]),
    **{family: (dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, first_k_dense_replace=1,
                     kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
                     head_dim=8, n_group=1, topk_group=1), ["q_a", "q_b", "kv_a", "kv_b", "o", "gate", "up", "down"],
                ["q_a", "q_b", "kv_a", "kv_b", "o"] + ["gate", "up", "down"] * 4
                + ["shared_gate", "shared_up", "shared_down"]) for family in ("deepseek_v2", "deepseek_v3")},
}


@pytest.mark.parametrize("family", sorted(NEW_MAPS))
def test_glm_gpt_oss_and_deepseek_maps_match_and_mask(family) -> None:
    overrides, first, second = NEW_MAPS[family]
    loaded = loaded_family(family, **overrides)
    model = loaded.model
    projections = find_projections(model)
    assert projection_coverage(model).mapped
    assert [p.type for p in layer_projections(projections, 0)] == first
    assert [p.type for p in layer_projections(projections, 1)] == (second or first)
    ids = tokenize_corpus(loaded, TEXT, seqlen=48, max_tokens=96)
    with torch.no_grad():
        dense = model(ids).logits
        with sparsify(model, uniform_budget(projections, 0.5, loaded.name, loaded.fingerprint)) as stats:
            sparse = model(ids).logits
        assert torch.equal(model(ids).logits, dense) and not torch.equal(sparse, dense)
    assert stats.overall() == pytest.approx(0.5, abs=0.02)


def test_deepseek_without_q_lora_has_a_whole_q() -> None:
    overrides = dict(NEW_MAPS["deepseek_v3"][0], q_lora_rank=None)
    types = [p.type for p in layer_projections(find_projections(make_tiny_family("deepseek_v3", **overrides)), 0)]
    assert types == ["q", "kv_a", "kv_b", "o", "gate", "up", "down"]


SSM_FAMILIES = {  # family -> (config overrides, decoder layers' prefix, where the mixer sits in a layer)
    "mamba": (dict(state_size=8), "backbone.layers", "mixer"),
    "falcon_mamba": (dict(state_size=8), "backbone.layers", "mixer"),
    # layers 0, 2 Mamba, 1, 3 attention; layers 1, 3 mixtures of experts
    "jamba": (dict(num_hidden_layers=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                   attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1,
                   mamba_d_state=8, mamba_dt_rank=4), "model.layers", "mamba"),
}


def called_modules(model: torch.nn.Module, ids: torch.Tensor) -> set[str]:
    """The modules whose forward ran on ``ids`` (a hook on a module that is never called never fires)."""
    called: set[str] = set()
    handles = [module.register_forward_pre_hook(lambda m, a, name=name: called.add(name))
               for name, module in model.named_modules()]
    with torch.no_grad():
        model(ids)
    for handle in handles:
        handle.remove()
    return called


@pytest.mark.parametrize("family", sorted(SSM_FAMILIES))
def test_mamba_dt_proj_is_skipped_because_its_module_is_never_called(family) -> None:
    """Mamba's mixer multiplies ``dt_proj.weight`` itself: a mask on dt_proj's input would never apply, so it is
    skipped by name; every projection that is taken is a module the forward calls, and is masked to its target."""
    overrides, prefix, mixer = SSM_FAMILIES[family]
    loaded = loaded_family(family, **overrides)
    model = loaded.model
    projections = find_projections(model)
    coverage = projection_coverage(model)
    assert coverage.mapped
    assert f"{prefix}.*.{mixer}.dt_proj (its weight is multiplied inside the mixer's forward, the module is never " \
           "called: a mask would not apply)" in coverage.skipped
    assert [p.type for p in layer_projections(projections, 0)] == ["in_proj", "x_proj", "out_proj"] + (
        ["gate", "up", "down"] if family == "jamba" else [])
    if family == "jamba":
        assert [p.type for p in layer_projections(projections, 1)] == ["q", "k", "v", "o"] + ["gate", "up", "down"] * 4
    ids = tokenize_corpus(loaded, TEXT, seqlen=48, max_tokens=96)
    assert {p.module_name for p in projections} <= called_modules(model, ids)
    assert f"{prefix}.0.{mixer}.dt_proj" not in called_modules(model, ids)  # why it is skipped
    budget = uniform_budget(projections, 0.5, loaded.name, loaded.fingerprint)
    dense = perplexity(loaded, ids)
    sparse = perplexity(loaded, ids, budget)
    assert sparse.ppl != dense.ppl and sparse.realized_sparsity == pytest.approx(0.5, abs=0.02)
    assert set(sparse.per_projection) == {p.name for p in projections}  # every projection measured, none left dense
    for p in projections:
        assert sparse.per_projection[p.name] == pytest.approx(0.5, abs=0.03), p.name
    assert perplexity(loaded, ids).nll == dense.nll
