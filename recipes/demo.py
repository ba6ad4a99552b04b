"""A small demo: fit a two-layer network with gradchain's AdamW and torch's, side by side."""

from __future__ import annotations

import torch

from gradchain import ChainOptimizer, recipes


def main() -> None:
    torch.manual_seed(0)
    x = torch.linspace(-3, 3, 512).unsqueeze(1)
    y = torch.sin(2 * x) + 0.1 * torch.randn_like(x)
    for label, make in [
        ("gradchain adamw", lambda p: ChainOptimizer(p, recipes.adamw(lr=1e-2))),
        ("torch AdamW", lambda p: torch.optim.AdamW(p, lr=1e-2)),
    ]:
        torch.manual_seed(1)
        model = torch.nn.Sequential(torch.nn.Linear(1, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
        opt = make(model.parameters())
        for _ in range(500):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
        print(f"{label:>16}: final loss {loss.item():.5f}")


if __name__ == "__main__":
    main()
