"""Readable reference of Gated DeltaNet (Yang, Kautz, Hatamizadeh 2024), the definition the chunked
form and the decode step in ``chunk.py`` are tested against. Per head, with q and k L2-normalised:

    S_t = exp(g_t) S_{t-1} - beta_t k_t (k_t^T exp(g_t) S_{t-1}) + beta_t k_t v_t^T     (state [Dk, Dv])
    o_t = scale * q_t^T S_t

i.e. S_t = a_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T with a_t = exp(g_t): the state decays,
forgets what it held under key k_t and stores v_t there. Token by token, in fp32 (fp64 for fp64 inputs).
Shapes as in ``chunk.py``.
"""

from typing import Optional, Tuple

import torch

from .chunk import check_inputs, compute_dtype, final_states, l2_normalize, segments


def gated_delta_rule_recurrent_ref(
    q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    check_inputs(q, k, v, g, beta, initial_state, cu_seqlens)
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    scale = Dk**-0.5 if scale is None else scale
    ct, out_dtype = compute_dtype(q), v.dtype
    q, k = (l2_normalize(x.to(ct)) for x in (q, k))
    v, a, beta = v.to(ct), g.to(ct).exp(), beta.to(ct)
    o = torch.zeros(v.shape, dtype=ct, device=v.device)
    finals = []
    for n, (start, end) in enumerate(segments(T, cu_seqlens)):
        if initial_state is None:
            S = torch.zeros(B if cu_seqlens is None else 1, H, Dk, Dv, dtype=ct, device=q.device)
        else:
            S = (initial_state if cu_seqlens is None else initial_state[n : n + 1]).to(ct)
        for t in range(start, end):
            kt, vt = k[:, t, :, :, None], v[:, t, :, None, :]  # [B, H, Dk, 1], [B, H, 1, Dv]
            at, bt = a[:, t, :, None, None], beta[:, t, :, None, None]
            S = at * S - bt * kt @ (kt.transpose(-1, -2) @ (at * S)) + bt * kt @ vt
            o[:, t] = scale * (q[:, t, :, None, :] @ S)[:, :, 0]
        finals.append(S)
    return o.to(out_dtype), final_states(finals, output_final_state)
