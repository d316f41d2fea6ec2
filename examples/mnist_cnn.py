"""The main job: the blog's MNIST CNN trained by full-batch SCG (the same as ``moller-scg mnist``).

python examples/mnist_cnn.py                       # embedded MNIST-5k, offline
python examples/mnist_cnn.py --data ~/data/mnist   # full MNIST from IDX files
python examples/mnist_cnn.py --help                # every option
"""

import sys

from moller_scg.cli import main

if __name__ == "__main__":
    sys.exit(main(["mnist", *sys.argv[1:]]))
