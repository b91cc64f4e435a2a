"""One projection's input magnitudes and where a budget cuts them (acttail_core.activations)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from acttail_core import activations
from acttail_core.activations import InputSample, capture_input, magnitude_histogram
from acttail_core.errors import ActTailError
from acttail_core.models import from_module
from acttail_core.projections import find_projections, get_module
from acttail_core.sparsify import sparsify
from tests.conftest import byte_tokenizer, make_tiny_family
from tests.test_evaluate import TEXT


def test_capture_is_the_dense_input_and_stops_early(tiny_loaded, monkeypatch):

    monkeypatch.setattr(activations, "load_text", lambda corpus, role="eval", max_chars=None: TEXT)
    name = "model.layers.0.self_attn.q_proj"
    reached = []
    handle = tiny_loaded.model.model.layers[1].register_forward_pre_hook(lambda m, a: reached.append(1))
    try:
        sample = capture_input(tiny_loaded, name, tokens=64)
    finally:
        handle.remove()
    assert reached == []  # the forward stopped at layer 0
    assert sample.magnitudes.shape == (64, 64) and (sample.magnitudes >= 0).all()
    seen = []
    module = tiny_loaded.model.model.layers[0].self_attn.q_proj
    handle = module.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().abs().reshape(-1, 64)))
    ids = tiny_loaded.tokenizer(TEXT)["input_ids"][:64]
    with torch.no_grad():
        tiny_loaded.model(torch.tensor([ids]))
    handle.remove()
    assert torch.allclose(sample.magnitudes, seen[0])
    with pytest.raises(ActTailError, match="not a projection"):
        capture_input(tiny_loaded, "model.embed_tokens", tokens=64)

    # The marked TopK cut is the sparsifier's: under a budget, the smallest magnitude each token keeps.
    from acttail_core.allocation import uniform_budget

    budget = uniform_budget(find_projections(tiny_loaded.model), 0.7, tiny_loaded.name, tiny_loaded.fingerprint)
    masked = []
    with torch.no_grad(), sparsify(tiny_loaded.model, budget):
        handle = module.register_forward_pre_hook(lambda m, a: masked.append(a[0].detach().reshape(-1, 64)))
        tiny_loaded.model(torch.tensor([ids]))
        handle.remove()
    kept = masked[0].abs()
    smallest_kept = torch.where(kept > 0, kept, torch.inf).amin(dim=-1)
    hist = magnitude_histogram(sample, 0.7)
    assert hist.kth_median == pytest.approx(float(np.median(smallest_kept.numpy())), rel=1e-5)


def test_histogram_cuts_match_the_sparsifier():
    torch.manual_seed(0)
    x = torch.randn(50, 200)
    sample = InputSample("p", "demo", x.abs())
    hist = magnitude_histogram(sample, 0.7)
    assert hist.keep == 60
    assert hist.share.sum() + hist.zero_share == pytest.approx(1.0)
    assert hist.topk_kept == pytest.approx(0.3)
    assert hist.threshold_kept == pytest.approx(0.3, abs=1e-3)
    assert hist.kth_low <= hist.kth_median <= hist.kth_high
    cut = x.abs().topk(60, dim=-1).values[:, -1]
    assert hist.kth_median == pytest.approx(float(np.median(cut.numpy())), rel=1e-6)
    zero = magnitude_histogram(sample, 0.0)
    assert zero.threshold == 0.0 and zero.topk_kept == 1.0
    with pytest.raises(ActTailError):
        magnitude_histogram(sample, 1.0)


@pytest.mark.parametrize("family, name, module_path", [
    ("phi3", "model.layers.1.self_attn.qkv_proj.k", "model.layers.1.self_attn.qkv_proj"),
    ("mixtral", "model.layers.0.mlp.experts.1.down", None),
])
def test_capture_reaches_a_fused_slice_and_an_expert(family, name, module_path, monkeypatch):
    """A slice of a fused layer gets the fused layer's input; an expert gets only the tokens routed to it."""
    monkeypatch.setattr(activations, "load_text", lambda corpus, role="eval", max_chars=None: TEXT)
    loaded = from_module(make_tiny_family(family), byte_tokenizer())
    sample = capture_input(loaded, name, tokens=64)
    projection = next(p for p in find_projections(loaded.model) if p.name == name)
    assert sample.magnitudes.shape[-1] == projection.in_features and (sample.magnitudes >= 0).all()
    if module_path is not None:
        assert sample.magnitudes.shape[0] == 64
        seen = []
        handle = get_module(loaded.model, module_path).register_forward_pre_hook(
            lambda m, a: seen.append(a[0].detach().abs().reshape(-1, a[0].shape[-1])))
        with torch.no_grad():
            loaded.model(torch.tensor([loaded.tokenizer(TEXT)["input_ids"][:64]]))
        handle.remove()
        assert torch.allclose(sample.magnitudes, seen[0])
    else:
        assert 0 < sample.magnitudes.shape[0] < 64 * 2  # top-2 routing: this expert saw some of the tokens
