"""The article's example: a convolutional VAE with a 2-d latent, here on scikit-learn's 8x8 digits.

As in the article's script (there on MNIST): the loss per image is the Bernoulli reconstruction
term (BCE with logits, summed over pixels; pixel values in [0, 1] are the targets) plus the KL
divergence of ``N(mu, sigma^2)`` from ``N(0, 1)``; a batch's loss is the mean over its images
(about 20-45 nats here). Optimizers are compared by the latent clusters per digit (a scatter of
the latent means coloured by label), by the KL term, and by a number for the clusters: the
accuracy of a 5-nearest-neighbour vote in the latent space (validation images, neighbours from
the training images).

Run alone: ``python -m recipes.vae --optimizers adamw,sgd``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .common import DigitsDataTask, EpochBatches, defaults_for


class ConvVAE(nn.Module):
    """Encoder conv 1->16 (8x8) -> conv 16->32 stride 2 (4x4) -> (mu, logvar) in R^latent; mirrored decoder."""

    def __init__(self, latent: int = 2) -> None:
        super().__init__()
        self.enc1 = nn.Conv2d(1, 16, 3, padding=1)
        self.enc2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.mu = nn.Linear(32 * 4 * 4, latent)
        self.logvar = nn.Linear(32 * 4 * 4, latent)
        self.dec_fc = nn.Linear(latent, 32 * 4 * 4)
        self.dec1 = nn.ConvTranspose2d(32, 16, 4, stride=2, padding=1)
        self.dec2 = nn.Conv2d(16, 1, 3, padding=1)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = F.relu(self.enc2(F.relu(self.enc1(x)))).flatten(1)
        return self.mu(h), self.logvar(h)

    def decode(self, z: Tensor) -> Tensor:
        h = F.relu(self.dec_fc(z)).view(-1, 32, 4, 4)
        return self.dec2(F.relu(self.dec1(h)))  # logits


def vae_terms(model: ConvVAE, x: Tensor, eps: Tensor | None) -> tuple[Tensor, Tensor]:
    """(reconstruction, KL) per image, averaged over the batch; ``eps=None`` decodes the mean."""
    mu, logvar = model.encode(x)
    z = mu if eps is None else mu + eps * (0.5 * logvar).exp()
    recon = F.binary_cross_entropy_with_logits(model.decode(z), x, reduction="sum") / len(x)
    kl = -0.5 * (1 + logvar - mu.square() - logvar.exp()).sum() / len(x)
    return recon, kl


class VAETask(DigitsDataTask):
    name = "vae"
    batch_size = 128
    epochs = 60
    eval_every = 60
    metrics = ("val_loss", "val_kl", "latent_knn_acc")
    optimizer_defaults = defaults_for(3e-3, sgd={"lr": 2e-3, "momentum": 0.9})

    def model(self) -> nn.Module:
        return ConvVAE()

    def batches(self, gen: torch.Generator) -> EpochBatches:
        return self.epoch_batches(lambda idx: self.x[idx], gen)

    def loss(self, model: nn.Module, batch: Any, gen: torch.Generator) -> tuple[Tensor, dict[str, Tensor]]:
        # the run's generator: the same noise for every optimizer
        eps = torch.randn(len(batch), 2, generator=gen).to(batch.device)
        recon, kl = vae_terms(model, batch, eps)
        return recon + kl, {"recon": recon.detach(), "kl": kl.detach()}

    @torch.no_grad()
    def latents(self, model: nn.Module, x: Tensor) -> Tensor:
        return model.encode(x)[0]

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        # the validation loss with the mean latent (no sampling noise), so it is deterministic
        recon, kl = vae_terms(model, self.x_val, None)
        zt, zv = self.latents(model, self.x), self.latents(model, self.x_val)
        knn = self.y[torch.cdist(zv, zt).topk(5, largest=False).indices]
        acc = (knn.mode(dim=1).values == self.y_val).float().mean()
        return {"val_loss": (recon + kl).item(), "val_kl": kl.item(), "latent_knn_acc": acc.item()}

    def plots(self, runs: list[Any], outdir: Path) -> list[Path]:
        import matplotlib.pyplot as plt

        x = torch.cat([self.x, self.x_val])
        y = torch.cat([self.y, self.y_val])
        cols = min(len(runs), 5)
        rows = -(-len(runs) // cols)
        fig, axes = plt.subplots(
            rows, cols, figsize=(3.2 * cols + 1.0, 3.3 * rows + 0.4), squeeze=False, layout="constrained"
        )
        for ax, run in zip(axes.flat, runs):
            z = self.latents(run.model, x)
            sc = ax.scatter(z[:, 0], z[:, 1], c=y, cmap="tab10", vmin=-0.5, vmax=9.5, s=3, alpha=0.8)
            kl = run.final.get("val_kl", float("nan"))
            ax.set_title(
                f"{run.label}\nKL {kl:.2f}, 5-NN acc {run.final.get('latent_knn_acc', float('nan')):.2f}", fontsize=9
            )
            ax.set_xticks([])
            ax.set_yticks([])
        for ax in list(axes.flat)[len(runs) :]:
            ax.axis("off")
        fig.colorbar(sc, ax=axes, ticks=range(10), label="digit", shrink=0.8)
        fig.suptitle("VAE latent means per digit (all 1797 images)", fontsize=10)
        path = outdir / "latent.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        return [path]


if __name__ == "__main__":
    from .compare import cli

    cli(task="vae")
