"""The measured search's cheap score: each option's output divergence from the diagonal
Fisher information of the model's next-token distributions with respect to the output of
the layer it changes.

For a change δ of decoder layer i's output h (every other layer in full precision), the
mean divergence the exact search measures, by running the later layers, is to second order

    KL(p(h) || p(h + δ)) = ½ δᵀ F δ + O(|δ|³),    F = E_{y ~ p(h)} [g gᵀ],
    g = ∇_h Σ_t log p(y_t | h)   (y_t: a token drawn from the model's own distribution at
                                  every position t, so E[g] = 0 and F is the Fisher)

(the Fisher is the Hessian of the KL at δ = 0). Keeping the diagonal of F, per position
and channel, gives ½ Σ_{t,d} F_{t,d} δ_{t,d}², the Fisher-weighted output error that BRECQ
(Li et al., ICLR 2021, eq. 10) uses to weight a block's reconstruction. One backward pass
of the whole model per sampled y gives F for every layer at once, so an option costs one
forward of its own layer instead of a forward of every layer after it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from casp.devices import to_device


def layer_output_fishers(model, spec, ctx, batches: int, samples: int, seed: int = 0
                         ) -> dict[int, list[torch.Tensor]]:
    """{layer k: [diagonal Fisher of layer k's output, one bfloat16 CPU tensor shaped like
    that output per calibration batch]} for every layer k from ``ctx.index`` on, from
    ``samples`` draws of the next tokens on the first ``batches`` calibration batches
    (inputs of layer ``ctx.index`` from ``ctx.inputs``)."""
    decoder = spec.decoder_layers(model)
    device = ctx.device
    generator = torch.Generator().manual_seed(seed)
    norm = model.get_submodule(spec.norm)
    head = model.get_submodule(spec.head)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:              # gradients with respect to the hidden states only
        p.requires_grad_(False)
    fishers: dict[int, list[torch.Tensor]] = {k: [] for k in range(ctx.index, len(decoder))}
    try:
        for j in range(min(batches, len(ctx.inputs.hidden))):
            with torch.enable_grad():
                h = ctx.inputs.hidden[j].to(device).requires_grad_(True)
                kwargs = to_device(ctx.inputs.kwargs[j], device)
                outputs = []
                for k in range(ctx.index, len(decoder)):
                    layer = ctx.layer if k == ctx.index else decoder[k].to(device)
                    out = layer(h, **kwargs)
                    h = out[0] if isinstance(out, tuple) else out
                    outputs.append(h)
                logp = F.log_softmax(head.to(device)(norm.to(device)(h)).float(), dim=-1)
                logp = logp.reshape(-1, logp.shape[-1])
            probs = logp.detach().exp().cpu()
            sums = [torch.zeros(o.shape, dtype=torch.float32, device=device) for o in outputs]
            for s in range(samples):
                drawn = torch.multinomial(probs, 1, generator=generator).to(device)
                with torch.enable_grad():
                    loss = logp.gather(1, drawn).sum()
                grads = torch.autograd.grad(loss, outputs, retain_graph=s < samples - 1)
                for total, g in zip(sums, grads):
                    total.addcmul_(g.float(), g.float())
            for k, total in zip(fishers, sums):
                fishers[k].append((total / samples).to(torch.bfloat16).cpu())
            del logp, outputs, sums
            if device.type != "cpu":
                for k in range(ctx.index + 1, len(decoder)):
                    decoder[k].to("cpu")
                norm.to("cpu")
                head.to("cpu")
    finally:
        for p in params:
            p.requires_grad_(True)
    return fishers


@torch.no_grad()
def fisher_divergence(fisher: list[torch.Tensor], reference: list[torch.Tensor],
                      changed: list[torch.Tensor]) -> float:
    """½ Σ F δ² per token (the second-order mean KL): ``reference`` and ``changed`` the
    layer's outputs per batch before and after the change, ``fisher`` its diagonal Fisher."""
    total, tokens = 0.0, 0
    for f, ref, new in zip(fisher, reference, changed):
        delta = new.float() - ref.to(new.device).float()
        total += 0.5 * float((f.to(new.device).float() * delta * delta).sum())
        tokens += ref.shape[0] * ref.shape[1]
    return total / max(tokens, 1)
