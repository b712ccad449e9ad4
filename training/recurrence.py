"""The time loops of the vanilla RNN, the GRU and the LSTM with their backward passes written out by hand.

Autograd through a Python time loop records every small operation of every step, and its backward computes
the recurrent weights' gradient as T separate (H, B) x (B, G*H) products that it then adds up one by one.
These ``torch.autograd.Function``s run the same equations (see ``model.py``) with a handful of in-place
kernels per step, keep the per-step quantities the backward needs in preallocated (T, B, .) buffers, and
compute dW_hh and the biases' gradients once, as single large products over all T*B rows, after the
backward time loop. They are checked against the step-by-step autograd reference (``fused=False``) and with
``torch.autograd.gradcheck`` in tests/test_model.py.

Everything here is time-major: inputs (T, B, G*H) with the input bias already added, outputs (T, B, H).
For the rnn and the gru the final state is the last output row, so there is one output tensor and one
gradient to receive; the lstm's state also holds the cell c, so ``LSTMScan`` returns the final c as a second
output, and the gradient that reaches it (through the layer's final state) enters its backward time loop.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class RNNScan(torch.autograd.Function):
    """h_t = tanh(xw_t + h_{t-1} W_hh) for t = 1..T, where xw_t = x_t W_xh + b_h."""

    @staticmethod
    def forward(ctx: Any, xw: Tensor, h0: Tensor, W_hh: Tensor) -> Tensor:
        hs = torch.empty_like(xw)  # (T, B, H)
        h = h0
        for t in range(xw.shape[0]):
            torch.addmm(xw[t], h, W_hh, out=hs[t])
            h = hs[t].tanh_()
        ctx.save_for_backward(h0, W_hh, hs)
        return hs

    @staticmethod
    def backward(ctx: Any, grad_hs: Tensor) -> tuple[Tensor | None, ...]:
        h0, W_hh, hs = ctx.saved_tensors
        g = grad_hs.contiguous()  # (T, B, H): gradient reaching each h_t from above (output layer, next layer)
        W_t = W_hh.t()
        da = (hs * hs).neg_().add_(1.0)  # (T, B, H): tanh' = 1 - h_t^2, overwritten step by step with dL/da_t
        dh = g[-1]
        for t in range(hs.shape[0] - 1, 0, -1):
            da[t].mul_(dh)  # dL/da_t = dL/dh_t * (1 - h_t^2)
            dh = torch.addmm(g[t - 1], da[t], W_t)  # dL/dh_{t-1}: from above plus through W_hh
        da[0].mul_(dh)
        H = hs.shape[-1]
        grad_h0 = da[0] @ W_t if ctx.needs_input_grad[1] else None
        grad_W = None
        if ctx.needs_input_grad[2]:  # sum_t h_{t-1}^T da_t, as two products instead of T
            grad_W = h0.t() @ da[0]
            if hs.shape[0] > 1:
                grad_W.addmm_(hs[:-1].reshape(-1, H).t(), da[1:].reshape(-1, H))
        return da, grad_h0, grad_W


class GRUScan(torch.autograd.Function):
    """The GRU of ``model.py``: with hh = h_{t-1} W_hh + b_hh split as [hh_r, hh_z, hh_n],

    r = sigmoid(xw_r + hh_r),  z = sigmoid(xw_z + hh_z),  n = tanh(xw_n + r * hh_n),  h_t = n + z * (h_{t-1} - n)
    """

    @staticmethod
    def forward(ctx: Any, xw: Tensor, h0: Tensor, W_hh: Tensor, b_hh: Tensor) -> Tensor:
        T, B, G = xw.shape
        H = G // 3
        hh = torch.empty_like(xw)  # (T, B, 3H): h_{t-1} W_hh + b_hh
        rz = xw.new_empty(T, B, 2 * H)  # (T, B, 2H): [r, z]
        n = xw.new_empty(T, B, H)
        hs = xw.new_empty(T, B, H)
        h = h0
        for t in range(T):
            torch.addmm(b_hh, h, W_hh, out=hh[t])
            torch.add(xw[t, :, : 2 * H], hh[t, :, : 2 * H], out=rz[t]).sigmoid_()
            torch.addcmul(xw[t, :, 2 * H :], rz[t, :, :H], hh[t, :, 2 * H :], out=n[t]).tanh_()
            torch.addcmul(n[t], rz[t, :, H:], torch.sub(h, n[t]), out=hs[t])
            h = hs[t]
        ctx.save_for_backward(h0, W_hh, hs, hh, rz, n)
        return hs

    @staticmethod
    def backward(ctx: Any, grad_hs: Tensor) -> tuple[Tensor | None, ...]:
        h0, W_hh, hs, hh, rz, n = ctx.saved_tensors
        T, _, H = hs.shape
        g = grad_hs.contiguous()
        W_t = W_hh.t()
        r, z, hh_n = rz[..., :H], rz[..., H:], hh[..., 2 * H :]
        h_prev = torch.cat([h0.unsqueeze(0), hs[:-1]])  # (T, B, H)
        # Everything that does not depend on dL/dh_t, for all steps at once:
        a_n = (1 - z) * (1 - n * n)  # dL/d(pre-activation of n) = dh * a_n
        c_r = a_n * hh_n * r * (1 - r)  # dL/d(pre-activation of r) = dh * c_r
        c_z = (h_prev - n) * z * (1 - z)  # dL/d(pre-activation of z) = dh * c_z
        d_hh = torch.empty_like(hh)  # (T, B, 3H): dL/dhh_t
        d_n = torch.empty_like(n)  # dL/d(pre-activation of n), which is also dL/dxw_n
        dh = g[-1]
        for t in range(T - 1, -1, -1):
            torch.mul(dh, c_r[t], out=d_hh[t, :, :H])
            torch.mul(dh, c_z[t], out=d_hh[t, :, H : 2 * H])
            torch.mul(dh, a_n[t], out=d_n[t])
            torch.mul(d_n[t], r[t], out=d_hh[t, :, 2 * H :])
            carried = dh * z[t]  # h_t depends on h_{t-1} directly through z * h_{t-1}
            if t > 0:
                carried += g[t - 1]
            dh = torch.addmm(carried, d_hh[t], W_t)
        grad_xw = torch.cat([d_hh[..., : 2 * H], d_n], dim=-1)
        grad_W = h_prev.reshape(-1, H).t() @ d_hh.reshape(-1, 3 * H) if ctx.needs_input_grad[2] else None
        grad_b = d_hh.sum(dim=(0, 1)) if ctx.needs_input_grad[3] else None
        return grad_xw, dh if ctx.needs_input_grad[1] else None, grad_W, grad_b


class LSTMScan(torch.autograd.Function):
    """The LSTM of ``model.py``: with a_t = xw_t + h_{t-1} W_hh split as [a_i, a_f, a_g, a_o],

    i = sigmoid(a_i),  f = sigmoid(a_f),  g = tanh(a_g),  o = sigmoid(a_o)
    c_t = f * c_{t-1} + i * g,  h_t = o * tanh(c_t)

    Returns every h_t (T, B, H) and the final cell c_T (B, H), a tensor of its own: the layer's final state is
    [h_T, c_T], and a gradient reaching c_T is the starting value of dL/dc in the backward loop.
    """

    @staticmethod
    def forward(ctx: Any, xw: Tensor, h0: Tensor, c0: Tensor, W_hh: Tensor) -> tuple[Tensor, Tensor]:
        T, B, G = xw.shape
        H = G // 4
        gates = torch.empty_like(xw)  # (T, B, 4H): a_t, then overwritten in place with [i, f, g, o]
        cs = xw.new_empty(T, B, H)  # c_t
        tc = xw.new_empty(T, B, H)  # tanh(c_t)
        hs = xw.new_empty(T, B, H)
        h, c = h0, c0
        for t in range(T):
            torch.addmm(xw[t], h, W_hh, out=gates[t])
            gates[t, :, : 2 * H].sigmoid_()  # i, f
            gates[t, :, 2 * H : 3 * H].tanh_()  # g
            gates[t, :, 3 * H :].sigmoid_()  # o
            torch.mul(gates[t, :, H : 2 * H], c, out=cs[t])
            cs[t].addcmul_(gates[t, :, :H], gates[t, :, 2 * H : 3 * H])
            torch.tanh(cs[t], out=tc[t])
            torch.mul(gates[t, :, 3 * H :], tc[t], out=hs[t])
            h, c = hs[t], cs[t]
        ctx.save_for_backward(h0, c0, W_hh, hs, cs, tc, gates)
        return hs, cs[-1].clone()  # c_T copied out of the buffer, so that it is an output with its own gradient

    @staticmethod
    def backward(ctx: Any, grad_hs: Tensor, grad_c: Tensor) -> tuple[Tensor | None, ...]:
        h0, c0, W_hh, hs, cs, tc, gates = ctx.saved_tensors
        T, B, H = hs.shape
        g_out = grad_hs.contiguous()  # (T, B, H): gradient reaching each h_t from above
        W_t = W_hh.t()
        i, f, g, o = gates.chunk(4, dim=-1)  # (T, B, H) views each
        c_prev = torch.cat([c0.unsqueeze(0), cs[:-1]])  # (T, B, H)
        # Everything that does not depend on dL/dh_t or dL/dc_t, for all steps at once, in one (T, B, 4H)
        # buffer that the loop then overwrites in place with dL/da_t:
        #   dL/da_i = dc * g i (1 - i),  dL/da_f = dc * c_{t-1} f (1 - f),  dL/da_g = dc * i (1 - g^2),
        #   dL/da_o = dh * tanh(c_t) o (1 - o),  where dc = dL/dc_t in full (carried plus through h_t)
        da = torch.cat([g * i * (1 - i), c_prev * f * (1 - f), i * (1 - g * g), tc * o * (1 - o)], dim=-1)
        dc_dh = o * (1 - tc * tc)  # (T, B, H): dL/dc_t gets dL/dh_t * o * (1 - tanh(c_t)^2) through h_t
        dh = g_out[-1]
        dc = grad_c  # (B, H): from the final state, then carried back through c_t = f * c_{t-1} + ...
        for t in range(T - 1, -1, -1):
            da[t, :, 3 * H :].mul_(dh)
            dc = torch.addcmul(dc, dh, dc_dh[t])  # dL/dc_t in full
            da[t, :, : 3 * H].view(B, 3, H).mul_(dc.unsqueeze(1))  # the i, f and g blocks all scale with dc
            dc = dc * f[t]  # dL/dc_{t-1} through the cell's own path
            if t > 0:
                dh = torch.addmm(g_out[t - 1], da[t], W_t)  # dL/dh_{t-1}: from above plus through W_hh
        grad_h0 = da[0] @ W_t if ctx.needs_input_grad[1] else None
        grad_W = None
        if ctx.needs_input_grad[3]:  # sum_t h_{t-1}^T da_t, as two products instead of T
            grad_W = h0.t() @ da[0]
            if T > 1:
                grad_W.addmm_(hs[:-1].reshape(-1, H).t(), da[1:].reshape(-1, 4 * H))
        return da, grad_h0, dc if ctx.needs_input_grad[2] else None, grad_W
