"""Where the ShapesWorld grounding diagnostics read and write; imported by the scripts beside it.

Inputs come from environment variables, because the folders are made by misp first:
  WORLD       a world folder written by `misp world generate --out DIR`
  PRETRAINED  a folder written by `misp world pretrain --out DIR` (it holds shapes-clip/ and
              shapes-llava/); only the scripts that start from its configs or processor need it
The shipped checkpoints are found in `models/` of the repository (ROOT below). Outputs default to
`out/diag/` under the repository root and can be moved with each script's own variable.
"""

import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
MODELS = ROOT / "models"


def _folder(name, made_by):
    value = os.environ.get(name)
    if not value:
        sys.exit(f"{name} is not set: point it to a folder made by `{made_by}` "
                 f"(bench/README.md gives the options each published figure used)")
    if not os.path.isdir(value):
        sys.exit(f"{name}={value} is not a folder: make it with `{made_by}`")
    return value


def world():
    """The world folder named by WORLD (required)."""
    return _folder("WORLD", "misp world generate --out DIR")


def pretrained(name):
    """`PRETRAINED/name`, e.g. pretrained("shapes-clip") (PRETRAINED required)."""
    return os.path.join(_folder("PRETRAINED", "misp world pretrain --world WORLD --out DIR"), name)


def output(var, default):
    """The path in environment variable `var`, else `out/diag/<default>` under the repository
    root; the parent folder is created."""
    path = os.environ.get(var) or str(ROOT / "out" / "diag" / default)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return path
