"""A character-level recurrent language model written from its equations.

Vanilla RNN, per layer and time step (the same weights at every step):

    h_t = tanh(x_t W_xh + h_{t-1} W_hh + b_h)
    o_t = h_t W_hq + b_q                       (top layer only)

x_t is the one-hot vector of the input character in the first layer, so x_t W_xh is row ``token`` of W_xh:
an embedding lookup stands in for the one-hot product. Deeper layers take the layer below's h_t as x_t.

GRU and LSTM cells follow PyTorch's formulation (so that ``nn.GRU``/``nn.LSTM`` and the ONNX GRU with
``linear_before_reset=1``/LSTM operators compute exactly the same function); see each cell's docstring.

State: one flat tensor per sequence, (B, state_size), whatever the cell. Layer l owns the slice
[l * per_layer, (l + 1) * per_layer) where per_layer is H (rnn, gru) or 2H (lstm: h then c). The export and
the service only ever see this flat tensor.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .config import ModelConfig
from .recurrence import GRUScan, LSTMScan, RNNScan

GATES = {"rnn": 1, "gru": 3, "lstm": 4}  # how many H-sized blocks each input projection has


class RecurrentLayer(nn.Module):
    """One layer: input projection for every step at once, then the recurrence in a Python time loop
    (:mod:`.recurrence`'s hand-written one, or the step functions below under autograd).

    Parameters (G = 1 for rnn, 3 for gru, 4 for lstm):
        W_xh (I, G*H)  input weights; in the first layer I is the vocabulary and this is the embedding
        W_hh (H, G*H)  recurrent weights, shared by every time step
        b_h  (G*H,)    bias added with the input
        b_hh (G*H,)    gru only: bias of the recurrent product (the candidate's part is gated by r)
    """

    def __init__(self, cell: str, input_size: int, hidden_size: int, init: str = "uniform"):
        super().__init__()
        self.cell = cell
        self.hidden_size = H = hidden_size
        G = GATES[cell]
        bound = 1.0 / math.sqrt(H)
        self.W_xh = nn.Parameter(torch.empty(input_size, G * H).uniform_(-bound, bound))
        self.W_hh = nn.Parameter(torch.empty(H, G * H).uniform_(-bound, bound))
        self.b_h = nn.Parameter(torch.empty(G * H).uniform_(-bound, bound))
        if cell == "gru":
            self.b_hh = nn.Parameter(torch.empty(G * H).uniform_(-bound, bound))
        self.fused = True  # run the hand-written time loops of recurrence.py (False: the autograd reference)
        if init == "orthogonal":  # spectral radius 1 per gate: the state neither vanishes nor explodes at first
            with torch.no_grad():
                for g in range(G):
                    nn.init.orthogonal_(self.W_hh[:, g * H : (g + 1) * H])

    def project(self, x: Tensor) -> Tensor:
        """x_t W_xh + b_h for all steps at once: ids (T, B) -> (T, B, G*H), or features (T, B, I) -> same."""
        if x.dtype == torch.long:
            return nn.functional.embedding(x, self.W_xh) + self.b_h  # the one-hot product, as a lookup
        return x @ self.W_xh + self.b_h

    def forward(self, x: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        """Time-major: x ids (T, B) or features (T, B, I); state (B, per_layer) -> outputs (T, B, H), new state.

        Every cell's time loop runs in :mod:`.recurrence` (hand-written backward) unless ``fused`` is off; with
        ``fused`` off it runs the step functions below under autograd, the reference the tests check it against.
        For the lstm the state slice is [h, c] (B, 2H) and so is the new state.
        """
        xw = self.project(x)  # (T, B, G*H)
        if self.fused:
            # the time loops run in the weights' precision (float32) even under bf16 autocast: the state is
            # carried over hundreds of steps, and their in-place kernels write into buffers of one dtype
            with torch.autocast(xw.device.type, enabled=False):
                xw, state = xw.to(self.W_hh.dtype), state.to(self.W_hh.dtype)
                if self.cell == "rnn":
                    hs = RNNScan.apply(xw, state, self.W_hh)  # (T, B, H)
                    return hs, hs[-1]
                if self.cell == "gru":
                    hs = GRUScan.apply(xw, state, self.W_hh, self.b_hh)
                    return hs, hs[-1]
                H = self.hidden_size
                hs, c = LSTMScan.apply(xw, state[:, :H], state[:, H:], self.W_hh)  # (T, B, H), (B, H)
                return hs, torch.cat([hs[-1], c], dim=1)
        step = {"rnn": self.rnn_step, "gru": self.gru_step, "lstm": self.lstm_step}[self.cell]
        outputs = []
        for xw_t in xw.unbind(0):  # unbind, not xw[t]: its backward is one stack, not T full-size copies
            h, state = step(xw_t, state)
            outputs.append(h)
        return torch.stack(outputs), state  # (T, B, H)

    def rnn_step(self, xw: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        """h_t = tanh(x_t W_xh + b_h + h_{t-1} W_hh)."""
        h = torch.tanh(xw + h @ self.W_hh)
        return h, h

    def gru_step(self, xw: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        """Gates in the order reset r, update z, candidate n:

        r = sigmoid(x W_xr + b_r + h W_hr + b_hr)
        z = sigmoid(x W_xz + b_z + h W_hz + b_hz)
        n = tanh(x W_xn + b_n + r * (h W_hn + b_hn))
        h_t = (1 - z) * n + z * h_{t-1}
        """
        x_r, x_z, x_n = xw.chunk(3, dim=1)
        h_r, h_z, h_n = (h @ self.W_hh + self.b_hh).chunk(3, dim=1)  # (B, H) each
        r = torch.sigmoid(x_r + h_r)
        z = torch.sigmoid(x_z + h_z)
        n = torch.tanh(x_n + r * h_n)
        h = (1 - z) * n + z * h
        return h, h

    def lstm_step(self, xw: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        """Gates in the order input i, forget f, candidate g, output o; state holds [h, c]:

        [i, f, g, o] = x W_xh + b_h + h W_hh;  c_t = sigmoid(f) * c + sigmoid(i) * tanh(g)
        h_t = sigmoid(o) * tanh(c_t)
        """
        H = self.hidden_size
        h, c = state[:, :H], state[:, H:]
        i, f, cand, o = (xw + h @ self.W_hh).chunk(4, dim=1)  # (B, H) each
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(cand)
        h = torch.sigmoid(o) * torch.tanh(c)
        return h, torch.cat([h, c], dim=1)


class CharRNN(nn.Module):
    """Stacked recurrent layers and the output layer o_t = h_t W_hq + b_q."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        H = config.hidden_size
        self.layers = nn.ModuleList(
            RecurrentLayer(config.cell, config.vocab_size if i == 0 else H, H, config.init)
            for i in range(config.num_layers)
        )
        bound = 1.0 / math.sqrt(H)
        self.W_hq = nn.Parameter(torch.empty(H, config.vocab_size).uniform_(-bound, bound))
        self.b_q = nn.Parameter(torch.zeros(config.vocab_size))
        self.drop = nn.Dropout(config.dropout)

    def initial_state(self, batch_size: int, device: torch.device | str | None = None) -> Tensor:
        """Zeros (B, S), on the model's device unless ``device`` says otherwise."""
        return torch.zeros(batch_size, self.config.state_size, device=device or self.W_hq.device)  # (B, S)

    def forward(self, tokens: Tensor, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """tokens (B, T) int64, state (B, S) -> logits (B, T, V), state (B, S)."""
        if state is None:
            state = self.initial_state(tokens.shape[0], tokens.device)
        per = self.config.state_per_layer
        x: Tensor = tokens.t()  # (T, B): the layers run time-major
        new_states = []
        for i, layer in enumerate(self.layers):
            x, s = layer(x, state[:, i * per : (i + 1) * per])  # (T, B, H)
            x = self.drop(x)
            new_states.append(s)
        logits = x.transpose(0, 1) @ self.W_hq + self.b_q  # (B, T, V)
        return logits, torch.cat(new_states, dim=1)

    def set_fused(self, fused: bool) -> None:
        """Use the hand-written time loops of every cell (the default) or the step-by-step autograd reference."""
        for layer in self.layers:
            assert isinstance(layer, RecurrentLayer)
            layer.fused = fused
