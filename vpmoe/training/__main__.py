"""`torchrun --nproc-per-node N -m vpmoe.training --out runs/x ...`: the same as `vpmoe train`."""

import sys

from vpmoe.cli import main

sys.exit(main(["train", *sys.argv[1:]]))
