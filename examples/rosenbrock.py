"""The blog's Figure 2: SCG, SGD and Adam on Rosenbrock's function from the same start.

    python examples/rosenbrock.py                 # prints the table
    python examples/rosenbrock.py --plot out.png  # also draws the paths on the contour plot and the losses

SCG needs no learning rate; SGD and Adam use the blog's η = 0.01 (SGD diverges at that rate on this function,
so it gets η = 0.001, the largest power of ten at which it does not).
"""

from __future__ import annotations

import argparse

import torch

from moller_scg import SCG

START = (-1.2, 1.0)


def rosenbrock(w: torch.Tensor) -> torch.Tensor:
    """f(x, y) = (1 − x)² + 100 (y − x²)², minimum 0 at (1, 1)."""
    return (1 - w[0]) ** 2 + 100 * (w[1] - w[0] ** 2) ** 2


def run_scg(iterations: int) -> list[tuple[float, float, float]]:
    w = torch.nn.Parameter(torch.tensor(START, dtype=torch.float64))
    optimizer = SCG([w])

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = rosenbrock(w)
        loss.backward(create_graph=True)  # SCG's exact curvature by double-backward
        return loss

    path = [(*w.tolist(), float(rosenbrock(w.detach())))]
    for _ in range(iterations):
        loss = optimizer.step(closure)
        path.append((*w.tolist(), float(loss)))
    return path


def run_first_order(make_optimizer, iterations: int) -> list[tuple[float, float, float]]:
    w = torch.nn.Parameter(torch.tensor(START, dtype=torch.float64))
    optimizer = make_optimizer([w])
    path = [(*w.tolist(), float(rosenbrock(w.detach())))]
    for _ in range(iterations):
        optimizer.zero_grad()
        loss = rosenbrock(w)
        loss.backward()
        optimizer.step()
        path.append((*w.tolist(), float(rosenbrock(w.detach()))))
    return path


def iterations_to(path: list[tuple[float, float, float]], target: float) -> int | None:
    return next((k for k, (_, _, loss) in enumerate(path) if loss <= target), None)


def plot(paths: dict[str, list[tuple[float, float, float]]], filename: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (contour_axes, loss_axes) = plt.subplots(1, 2, figsize=(11, 4.5))
    x, y = torch.meshgrid(torch.linspace(-2, 2, 300), torch.linspace(-1, 3, 300), indexing="xy")
    z = (1 - x) ** 2 + 100 * (y - x**2) ** 2
    contour_axes.contour(x, y, torch.log10(z + 1e-3), levels=30, cmap="Greys", linewidths=0.6)
    for name, path in paths.items():
        xs, ys, losses = zip(*path)
        contour_axes.plot(xs, ys, ".-", markersize=3, linewidth=1, label=name)
        loss_axes.semilogy([max(loss, 1e-30) for loss in losses], label=name)
    contour_axes.plot(*START, "ko")
    contour_axes.plot(1, 1, "k*", markersize=12)
    contour_axes.set(title="Paths on f(x, y) = (1 − x)² + 100(y − x²)²", xlabel="x", ylabel="y")
    loss_axes.set(title="Loss against iterations", xlabel="iteration", ylabel="f")
    contour_axes.legend()
    loss_axes.legend()
    figure.tight_layout()
    figure.savefig(filename, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> dict[str, list[tuple[float, float, float]]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=2000, help="iterations for each optimizer (default 2000)")
    parser.add_argument("--plot", metavar="FILE", help="save the figure (PNG) to FILE")
    args = parser.parse_args(argv)
    paths = {
        "SCG": run_scg(args.iterations),
        "Adam (η = 0.01)": run_first_order(lambda p: torch.optim.Adam(p, lr=0.01), args.iterations),
        "SGD (η = 0.001)": run_first_order(lambda p: torch.optim.SGD(p, lr=0.001), args.iterations),
    }
    print(f"{'optimizer':<18} {'final loss':>12} {'final (x, y)':>22} {'iterations to f < 1e-6':>24}")
    for name, path in paths.items():
        x, y, loss = path[-1]
        reached = iterations_to(path, 1e-6)
        print(f"{name:<18} {loss:12.3e} {f'({x:.6f}, {y:.6f})':>22} {reached if reached is not None else '—':>24}")
    if args.plot:
        plot(paths, args.plot)
        print(f"figure saved to {args.plot}")
    return paths


if __name__ == "__main__":
    main()
