"""Training objectives.

CGDR (class-guided denoising regularization, Face2Diffusion): inside the head mask M the
prediction is pulled to the true noise; outside it, to the frozen model's prediction for the
class prompt ("a photo of a person"), which carries no gradient:

    L = mean( M (eps* - eps)^2 ) + lambda * mean( (1 - M) (eps* - eps_class)^2 )
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def cgdr_loss(eps_pred, eps, eps_class, mask, lam: float):
    """(loss, {"loss_fg", "loss_bg"}); all arrays broadcast to eps' shape, means in float32.

    eps_pred: the UNet's prediction with the identity prompt; eps: the noise that was added;
    eps_class: the frozen prediction with the class prompt; mask: 1 on the head, 0 elsewhere.
    """
    eps_pred, eps, eps_class, mask = (x.astype(jnp.float32) for x in (eps_pred, eps, eps_class, mask))
    fg = jnp.mean(mask * jnp.square(eps_pred - eps))
    bg = jnp.mean((1 - mask) * jnp.square(eps_pred - jax.lax.stop_gradient(eps_class)))
    return fg + lam * bg, {"loss_fg": fg, "loss_bg": bg}
