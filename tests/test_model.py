"""The from-scratch cells against PyTorch's own modules, and their gradients."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from textgen.training.model import CharRNN, ModelConfig

V, H = 11, 7


def one_hot(ids: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    return nn.functional.one_hot(ids, V).to(dtype)


def reference(cell: str, num_layers: int) -> nn.Module:
    cls = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}[cell]
    return cls(V, H, num_layers=num_layers, batch_first=True)


def copy_into(model: CharRNN, ref: nn.Module) -> None:
    """Give our model the reference module's weights (ours are transposed; single-bias cells sum the biases)."""
    with torch.no_grad():
        for i, layer in enumerate(model.layers):
            layer.W_xh.copy_(getattr(ref, f"weight_ih_l{i}").T)
            layer.W_hh.copy_(getattr(ref, f"weight_hh_l{i}").T)
            b_ih, b_hh = getattr(ref, f"bias_ih_l{i}"), getattr(ref, f"bias_hh_l{i}")
            if model.config.cell == "gru":
                layer.b_h.copy_(b_ih)
                layer.b_hh.copy_(b_hh)
            else:
                layer.b_h.copy_(b_ih + b_hh)


def split_state(model: CharRNN, state: torch.Tensor):
    """Our flat (B, S) state as the reference's (layers, B, H) tensor(s)."""
    per = model.config.state_per_layer
    layers = [state[:, i * per : (i + 1) * per] for i in range(model.config.num_layers)]
    if model.config.cell == "lstm":
        return torch.stack([s[:, :H] for s in layers]), torch.stack([s[:, H:] for s in layers])
    return torch.stack(layers)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "autograd"])
@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
@pytest.mark.parametrize("num_layers", [1, 2])
def test_matches_torch_module(cell: str, num_layers: int, fused: bool) -> None:
    torch.manual_seed(0)
    model = CharRNN(ModelConfig(vocab_size=V, cell=cell, hidden_size=H, num_layers=num_layers))
    model.set_fused(fused)
    ref = reference(cell, num_layers)
    copy_into(model, ref)
    ids = torch.randint(0, V, (3, 13))
    state0 = torch.randn(3, model.config.state_size) * 0.5

    logits, state = model(ids, state0)
    out, ref_state = ref(one_hot(ids), split_state(model, state0))
    ref_logits = out @ model.W_hq + model.b_q

    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    if cell == "lstm":
        h, c = split_state(model, state)
        torch.testing.assert_close(h, ref_state[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(c, ref_state[1], atol=1e-5, rtol=1e-5)
    else:
        torch.testing.assert_close(split_state(model, state), ref_state, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
def test_same_weights_at_every_step(cell: str) -> None:
    """Running a sequence in one call equals running it one step at a time with the state carried."""
    torch.manual_seed(1)
    model = CharRNN(ModelConfig(vocab_size=V, cell=cell, hidden_size=H, num_layers=2))
    ids = torch.randint(0, V, (2, 9))
    whole, state_whole = model(ids)
    state = model.initial_state(2)
    steps = []
    for t in range(ids.shape[1]):
        logits, state = model(ids[:, t : t + 1], state)
        steps.append(logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), whole)
    torch.testing.assert_close(state, state_whole)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "autograd"])
@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
def test_gradcheck_float64(cell: str, fused: bool) -> None:
    torch.manual_seed(2)
    model = CharRNN(ModelConfig(vocab_size=5, cell=cell, hidden_size=3, num_layers=2)).double()
    model.set_fused(fused)
    ids = torch.randint(0, 5, (2, 4))
    names = [n for n, _ in model.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for p in model.parameters())
    state0 = (torch.randn(2, model.config.state_size, dtype=torch.float64) * 0.3).requires_grad_(True)

    def f(state, *ps):
        logits, state_out = torch.func.functional_call(model, dict(zip(names, ps, strict=True)), (ids, state))
        return logits, state_out

    assert torch.autograd.gradcheck(f, (state0, *params), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
def test_hand_written_backward_equals_autograd_through_the_steps(cell: str) -> None:
    """The fused time loops (recurrence.py) give the reference's outputs and the gradients of every
    parameter and of the initial state, with gradients arriving both from the logits and from the final state."""
    torch.manual_seed(3)
    fused = CharRNN(ModelConfig(vocab_size=V, cell=cell, hidden_size=H, num_layers=2)).double()
    reference = copy.deepcopy(fused)
    reference.set_fused(False)
    S = fused.config.state_size
    ids = torch.randint(0, V, (4, 17))
    w_logits, w_state = torch.randn(4, 17, V, dtype=torch.float64), torch.randn(4, S, dtype=torch.float64)
    grads = []
    for model in (fused, reference):
        state0 = (torch.randn(4, S, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) * 0.5)
        state0.requires_grad_(True)
        logits, state = model(ids, state0)
        ((logits * w_logits).sum() + (state * w_state).sum()).backward()
        grads.append([logits.detach(), state.detach(), state0.grad] + [p.grad for p in model.parameters()])
    for ours, ref in zip(*grads, strict=True):
        torch.testing.assert_close(ours, ref, atol=1e-12, rtol=1e-10)
    assert any(p.grad.abs().sum() > 0 for p in fused.layers[0].parameters())  # the comparison is not vacuous


@pytest.mark.parametrize("num_layers", [1, 2])
def test_lstm_gradient_from_the_final_cell_alone(num_layers: int) -> None:
    """A loss on the c part of the final state only (no logits, no h): the hand-written lstm backward must
    start its loop from that gradient and carry it back through every step, to the weights and to the initial
    state, exactly as autograd does through the steps."""
    torch.manual_seed(6)
    fused = CharRNN(ModelConfig(vocab_size=V, cell="lstm", hidden_size=H, num_layers=num_layers)).double()
    reference = copy.deepcopy(fused)
    reference.set_fused(False)
    S = fused.config.state_size
    ids = torch.randint(0, V, (3, 11))
    c_part = torch.zeros(S, dtype=torch.float64)
    for layer in range(num_layers):
        c_part[(2 * layer + 1) * H : (2 * layer + 2) * H] = 1.0  # layer l's slice is [h, c]
    w_state = torch.randn(3, S, dtype=torch.float64) * c_part
    grads = []
    for model in (fused, reference):
        state0 = (torch.randn(3, S, dtype=torch.float64, generator=torch.Generator().manual_seed(7)) * 0.5)
        state0.requires_grad_(True)
        _, state = model(ids, state0)
        (state * w_state).sum().backward()
        grads.append([state0.grad] + [p.grad for p in model.parameters()])
    for ours, ref in zip(*grads, strict=True):
        torch.testing.assert_close(ours, ref, atol=1e-12, rtol=1e-10)
    assert grads[0][0][:, H : 2 * H].abs().sum() > 0  # reaches the first layer's initial c ...
    assert fused.layers[0].W_hh.grad.abs().sum() > 0  # ... and the recurrent weights
    assert fused.W_hq.grad is None  # only the state was in the loss


def test_state_size_is_flat_whatever_the_cell() -> None:
    for cell, per in (("rnn", H), ("gru", H), ("lstm", 2 * H)):
        cfg = ModelConfig(vocab_size=V, cell=cell, hidden_size=H, num_layers=3)
        _, state = CharRNN(cfg)(torch.zeros(4, 2, dtype=torch.long))
        assert state.shape == (4, 3 * per) == (4, cfg.state_size)


def test_rejects_unknown_cell() -> None:
    with pytest.raises(ValueError, match="cell must be one of"):
        ModelConfig(vocab_size=V, cell="transformer", hidden_size=H, num_layers=1)


@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
def test_orthogonal_init_makes_each_recurrent_gate_block_orthogonal(cell: str) -> None:
    torch.manual_seed(5)
    cfg = ModelConfig(vocab_size=V, cell=cell, hidden_size=H, num_layers=1, init="orthogonal")
    W = CharRNN(cfg).layers[0].W_hh.detach()
    for g in range(W.shape[1] // H):
        block = W[:, g * H : (g + 1) * H]
        torch.testing.assert_close(block.T @ block, torch.eye(H), atol=1e-5, rtol=0)
    uniform = CharRNN(ModelConfig(vocab_size=V, cell=cell, hidden_size=H, num_layers=1)).layers[0].W_hh.detach()
    assert uniform.abs().max() <= 1 / H**0.5  # PyTorch's default bound
