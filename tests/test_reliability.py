"""Bad input everywhere it enters, as one table (issue 8).

Every row of CASES is one bad input: where it enters (op, data reader, preprocessing, inference,
checkpoint, resume, CLI), the input, and what the user sees: the exception type and a regex its
message must match, or, for inputs that are accepted on purpose, the documented behaviour.
`test_bad_input` runs them all; docs/reliability.md holds the same table with the real messages.

Regenerate the documentation table after adding a case (from the repository root):

    PYTHONPATH=. python tests/test_reliability.py > /tmp/table.md

Beside the table: op-argument layouts (non-contiguous, strided, storage offset, expanded with stride
0, overlapping rows, aliasing arguments) give the same results, bit for bit, as contiguous copies;
and the NaN/Inf behaviour of the ops and its guards in inference and checkpoints.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import gzip
import hashlib
import io
import json
import re
import shutil
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffrec_ext import checkpoint as ckpt
from diffrec_ext import cli, ops
from diffrec_ext import reference as ref
from diffrec_ext.checkpoint import CheckpointError
from diffrec_ext.data import DataFormatError, load_dataset, preprocess, read_interactions
from diffrec_ext.engine import InferenceEngine, UnknownItemsError
from diffrec_ext.inference import predict_h0
from diffrec_ext.recommender import Recommender
from diffrec_ext.schedules import NoiseSchedule
from diffrec_ext.synthetic import write_synthetic
from diffrec_ext.train import ConfigError, TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_torch_thread")
REPO_ROOT = Path(__file__).resolve().parent.parent


def target_ranks(model, histories, targets, **options):
    """The engine's target ranks of a model (the evaluation path)."""
    return InferenceEngine(model).target_ranks(histories, targets, **options)


def recommend(model, histories, batch_size=256, **options):
    """The engine's top-k of dense histories for a model."""
    return InferenceEngine(model, batch_size=batch_size).recommend_dense(histories, **options)


DOCS = REPO_ROOT / "docs" / "reliability.md"
C = torch.ops.diffrec_ext if ops.HAVE_EXTENSION else None
needs_ext = pytest.mark.skipif(not ops.HAVE_EXTENSION, reason="compiled extension not built")

TINY_FLAGS = ["--dim", "16", "--layers", "1", "--heads", "2", "--max-len", "8", "--num-steps", "20", "--seeds", "2",
              "--epochs", "2", "--batch-size", "64", "--device", "cpu", "--quiet", "--k-core", "2"]


# ================================================================================================
# The context every case runs in: a tiny data file and a run trained on it through the CLI.


class CLIExit(Exception):
    """A CLI call that ended with a non-zero exit status; the message is `exit N: <last stderr line>`."""


def run_cli(*argv) -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main([str(a) for a in argv])
        except SystemExit as stop:  # argparse
            code = stop.code
    lines = [line for line in err.getvalue().splitlines() if line.strip()]
    if code != 0:
        raise CLIExit(f"exit {code}; stderr: {lines[-1] if lines else ''}")
    return out.getvalue(), err.getvalue()


@dataclass
class Context:
    base: Path  # shared, read-only for the cases
    data: Path  # tiny sequence file
    run: Path  # run directory trained by `diffrec train` on `data`
    tmp: Path = None  # a fresh directory per case

    @property
    def best(self) -> Path:
        return ckpt.resolve(self.run, "best")

    def model(self):
        return ckpt.load_model(self.run)[0]

    def dataset(self):
        return load_dataset(self.data, k_core=2)

    def config(self) -> TrainConfig:
        return TrainConfig.from_dict(ckpt.read_json(self.best / ckpt.CONFIG_FILE)["config"])

    def copy_checkpoint(self) -> Path:
        target = self.tmp / "ck"
        shutil.copytree(self.best, target)
        return target

    def copy_run(self) -> Path:
        target = self.tmp / "run"
        shutil.copytree(self.run, target)
        return target


def build_context(base: Path) -> Context:
    base.mkdir(parents=True, exist_ok=True)
    data = write_synthetic(base / "tiny.txt", num_users=60, num_items=40, num_clusters=4, min_length=6, max_length=12)
    run = base / "run"
    run_cli("train", "--data", data, "--out", run, *TINY_FLAGS)
    return Context(base, data, run)


@pytest.fixture(scope="module")
def shared_context(tmp_path_factory):
    return build_context(tmp_path_factory.mktemp("reliability"))


@pytest.fixture
def context(shared_context, tmp_path):
    return Context(shared_context.base, shared_context.data, shared_context.run, tmp_path)


# ================================================================================================
# The cases


@dataclass(frozen=True)
class Case:
    id: str
    where: str  # e.g. "op seed_topk", "reader", "inference recommend", "CLI train"
    bad: str  # the bad input, in words
    run: Callable[[Context], Any]
    error: type | None  # None: accepted on purpose, `sees` says how (and `run` asserts it)
    match: str = ""  # re.search against str(exception)
    sees: str = ""
    needs_extension: bool = False


CASES: list[Case] = []


def case(id, where, bad, run, error, match="", sees="", ext=False):
    CASES.append(Case(id, where, bad, run, error, match, sees, ext))


# ------------------------------------------------------------------------------------------ ops

def denoiser_args(**overrides):
    gen = torch.Generator().manual_seed(0)
    sa, so = NoiseSchedule.create("sqrt", 10).noising_tables(dtype=torch.float32)
    args = dict(item_emb=torch.randn(2, 4, 8, generator=gen), pos_emb=torch.randn(4, 8, generator=gen),
                steps=torch.tensor([3, 7]), sqrt_abar=sa, sqrt_one_minus_abar=so,
                noise=torch.randn(2, 1, 8, generator=gen), padding_mask=torch.zeros(2, 4, dtype=torch.bool),
                noised_positions=1, add_position=True, add_step=True)
    args.update(overrides)
    return args


def call_denoiser(**overrides):
    return lambda ctx: C.denoiser_input(*denoiser_args(**overrides).values())


def call_denoiser_backward(**overrides):
    args = dict(grad_out=torch.randn(2, 4, 8), steps=torch.tensor([3, 7]),
                sqrt_abar=NoiseSchedule.create("sqrt", 10).noising_tables(dtype=torch.float32)[0],
                padding_mask=None, noised_positions=1, add_position=True)
    args.update(overrides)
    return lambda ctx: C.denoiser_input_backward(*args.values())


def catalog(batch=2, seeds=3, dim=8, items=40):
    gen = torch.Generator().manual_seed(1)
    return (torch.randn(batch, seeds, dim, generator=gen), torch.randn(items, dim, generator=gen),
            torch.randn(items, generator=gen))


H, W, BIAS = catalog()
H2 = H[:, 0].contiguous()  # [B, d] for the cross-entropy
TARGETS = torch.tensor([1, 2])
META = "meta"

for id_, bad, kwargs, match in [
    ("steps-above-N", "a diffusion step above N = 10", dict(steps=torch.tensor([3, 11])),
     r"steps\[1\] = 11 is out of range \[0, 10\]"),
    ("steps-negative", "a negative step", dict(steps=torch.tensor([-1, 0])), r"steps\[0\] = -1 is out of range"),
    ("steps-int32", "steps as int32", dict(steps=torch.tensor([3, 7], dtype=torch.int32)), "steps must be int64"),
    ("steps-wrong-length", "steps [3] for B = 2", dict(steps=torch.tensor([1, 2, 3])), r"steps must be \[B\] = \[2\]"),
    ("pos-emb-shape", "pos_emb [3, 8] for T = 4", dict(pos_emb=torch.randn(3, 8)), r"pos_emb must be \[T, d\] = \[4, 8\]"),
    ("noise-shape", "noise [2, 1, 8] with noised_positions = 2", dict(noised_positions=2),
     r"noise must be \[B, noised_positions, d\] = \[2, 2, 8\]"),
    ("noised-positions-above-T", "noised_positions = 5 > T = 4",
     dict(noised_positions=5, noise=torch.randn(2, 5, 8)), r"noised_positions = 5 must be in \[0, T = 4\]"),
    ("item-emb-integer", "item_emb of int64", dict(item_emb=torch.ones(2, 4, 8, dtype=torch.int64)),
     "item_emb must be float32, float64, bfloat16 or float16, got Long"),
    ("item-emb-2d", "item_emb [2, 4] (no d)", dict(item_emb=torch.randn(2, 4)), r"item_emb must be \[B, T, d\]"),
    ("pos-emb-dtype", "pos_emb float64, item_emb float32", dict(pos_emb=torch.randn(4, 8, dtype=torch.float64)),
     "pos_emb dtype Double differs from item_emb dtype Float"),
    ("noise-dtype", "noise bfloat16, item_emb float32", dict(noise=torch.randn(2, 1, 8).bfloat16()),
     "noise dtype BFloat16 differs"),
    ("mask-not-bool", "padding_mask of int32", dict(padding_mask=torch.zeros(2, 4, dtype=torch.int32)),
     "padding_mask must be bool"),
    ("mask-shape", "padding_mask [2, 3] for T = 4", dict(padding_mask=torch.zeros(2, 3, dtype=torch.bool)),
     r"padding_mask must be \[B, T\] = \[2, 4\]"),
    ("tables-differ", "sqrt_one_minus_abar [5] beside sqrt_abar [11]", dict(sqrt_one_minus_abar=torch.ones(5)),
     "sqrt_one_minus_abar shape .* differs from sqrt_abar shape"),
    ("table-integer", "integer sqrt_abar table",
     dict(sqrt_abar=torch.ones(11, dtype=torch.int64), sqrt_one_minus_abar=torch.ones(11, dtype=torch.int64)),
     "sqrt_abar must be float32"),
    ("empty-batch", "B = 0",
     dict(item_emb=torch.randn(0, 4, 8), steps=torch.zeros(0, dtype=torch.int64), noise=torch.randn(0, 1, 8),
          padding_mask=None), r"empty batch \(B = 0\)"),
    ("noise-on-meta", "noise on the meta device, the rest on the CPU", dict(noise=torch.randn(2, 1, 8, device=META)),
     "noise is on meta but item_emb is on cpu"),
]:
    case(f"op-denoiser-{id_}", "op denoiser_input", bad, call_denoiser(**kwargs), RuntimeError, match, ext=True)

case("op-denoiser-bwd-grad-2d", "op denoiser_input_backward", "grad_out [2, 4]",
     call_denoiser_backward(grad_out=torch.randn(2, 4)), RuntimeError, r"grad_out must be \[B, T, d\] with B > 0", ext=True)
case("op-denoiser-bwd-steps", "op denoiser_input_backward", "a step above N",
     call_denoiser_backward(steps=torch.tensor([11, 0])), RuntimeError, r"steps\[0\] = 11 is out of range \[0, 10\]",
     ext=True)

for id_, op, bad, call, match in [
    ("k-zero", "seed_topk", "k = 0", lambda: C.seed_topk(H, W, BIAS, 0, None, None), r"k = 0 must be in \[1, V = 40\]"),
    ("k-above-V", "seed_topk", "k = 41 > V", lambda: C.seed_topk(H, W, BIAS, 41, None, None),
     r"k = 41 must be in \[1, V = 40\]"),
    ("k-above-left", "seed_topk", "k = 3 with 38 of 40 items excluded",
     lambda: C.seed_topk(H, W, BIAS, 3, *ops.exclusion_csr([list(range(38)), []])),
     "k = 3 exceeds the 2 items left for user 0"),
    ("weight-d", "seed_topk", "weight [40, 4] for d = 8", lambda: C.seed_topk(H, W[:, :4], BIAS, 3, None, None),
     r"weight must be \[V, d\] with d = 8"),
    ("weight-empty", "seed_avg_probs", "weight [0, 8] (no items)",
     lambda: C.seed_avg_probs(H, W[:0], None), r"weight must hold at least one item \(V > 0\)"),
    ("bias-length", "seed_avg_probs", "bias [5] for V = 40", lambda: C.seed_avg_probs(H, W, BIAS[:5]),
     r"bias must be \[V\] = \[40\]"),
    ("weight-dtype", "seed_avg_probs", "weight float64, hidden float32", lambda: C.seed_avg_probs(H, W.double(), BIAS),
     "weight dtype Double differs from hidden dtype Float"),
    ("bias-dtype", "seed_avg_probs", "bias float64, hidden float32", lambda: C.seed_avg_probs(H, W, BIAS.double()),
     "bias dtype Double differs"),
    ("hidden-integer", "seed_avg_probs", "hidden of int64", lambda: C.seed_avg_probs(H.long(), W, BIAS),
     "hidden must be float32, float64, bfloat16 or float16"),
    ("hidden-2d", "seed_avg_probs", "hidden [S, d] without the batch", lambda: C.seed_avg_probs(H[0], W, BIAS),
     r"hidden must be \[B, S, d\]"),
    ("no-seeds", "seed_avg_probs", "hidden with S = 0", lambda: C.seed_avg_probs(H[:, :0], W, BIAS),
     r"at least one seed \(S > 0\)"),
    ("empty-batch", "seed_topk", "B = 0", lambda: C.seed_topk(H[:0], W, BIAS, 3, None, None), "empty batch"),
    ("target-above-V", "seed_target_rank", "target 40 with V = 40",
     lambda: C.seed_target_rank(H, W, BIAS, torch.tensor([0, 40]), None, None),
     r"targets\[1\] = 40 is out of range \[0, 39\]"),
    ("targets-int32", "seed_target_rank", "targets as int32",
     lambda: C.seed_target_rank(H, W, BIAS, TARGETS.int(), None, None), "targets must be int64"),
    ("exclude-id-above-V", "seed_topk", "excluded item 99 with V = 40",
     lambda: C.seed_topk(H, W, BIAS, 3, torch.tensor([0, 1, 3]), torch.tensor([1, 2, 99])),
     r"exclude_ids\[2\] = 99 is out of range \[0, 39\]"),
    ("exclude-ids-int32", "seed_topk", "exclude_ids as int32",
     lambda: C.seed_topk(H, W, BIAS, 3, torch.tensor([0, 1, 2]), torch.tensor([1, 2], dtype=torch.int32)),
     "exclude_ids must be int64"),
    ("offsets-decreasing", "seed_topk", "exclude_offsets [0, 2, 1, 2]",
     lambda: C.seed_topk(catalog(batch=3)[0], W, BIAS, 3, torch.tensor([0, 2, 1, 2]), torch.tensor([1, 2])),
     r"exclude_offsets must be non-decreasing, but exclude_offsets\[2\] < exclude_offsets\[1\]"),
    ("offsets-end", "seed_topk", "exclude_offsets ending at 1 for 2 ids",
     lambda: C.seed_topk(H, W, BIAS, 3, torch.tensor([0, 1, 1]), torch.tensor([1, 2])),
     r"exclude_offsets\[2\] = 1 must equal len\(exclude_ids\) = 2"),
    ("offsets-start", "seed_topk", "exclude_offsets starting at 1",
     lambda: C.seed_topk(H, W, BIAS, 3, torch.tensor([1, 1, 2]), torch.tensor([1, 2])),
     r"exclude_offsets\[0\] = 1 must be 0"),
    ("offsets-length", "seed_topk", "exclude_offsets [2] for B = 2",
     lambda: C.seed_topk(H, W, BIAS, 3, torch.tensor([0, 2]), torch.tensor([1, 2])),
     r"exclude_offsets must be \[B \+ 1\] = \[3\]"),
    ("offsets-alone", "seed_topk", "exclude_offsets without exclude_ids",
     lambda: C.seed_topk(H, W, BIAS, 3, torch.tensor([0, 1, 1]), None), "must be given together"),
    ("lse-shape", "seed_topk", "lse [2, 4] for S = 3", lambda: C.seed_topk(H, W, BIAS, 3, None, None, torch.zeros(2, 4)),
     r"lse must be \[B, S\] = \[2, 3\]"),
    ("lse-dtype", "seed_topk", "lse float64 for bfloat16 hidden",
     lambda: C.seed_topk(H.bfloat16(), W.bfloat16(), BIAS.bfloat16(), 3, None, None, torch.zeros(2, 3).double()),
     "lse must be Float for BFloat16 hidden"),
    ("weight-on-meta", "seed_avg_probs", "weight on the meta device, hidden on the CPU",
     lambda: C.seed_avg_probs(H, W.to(META), BIAS), "weight is on meta but hidden is on cpu"),
    ("targets-on-meta", "seed_target_rank", "targets on the meta device",
     lambda: C.seed_target_rank(H, W, BIAS, TARGETS.to(META), None, None), "targets is on meta but hidden is on cpu"),
    ("xent-target-negative", "catalog_xent", "target -3 (only -1 = absent is allowed)",
     lambda: C.catalog_xent(H2, W, BIAS, torch.tensor([-3, 0])), r"targets\[0\] = -3 is out of range \[-1, 39\]"),
    ("xent-targets-length", "catalog_xent", "targets [1] for B = 2",
     lambda: C.catalog_xent(H2, W, BIAS, torch.tensor([0])), r"targets must be \[B\] = \[2\]"),
    ("xent-hidden-3d", "catalog_xent", "hidden [B, S, d] instead of [B, d]",
     lambda: C.catalog_xent(H, W, BIAS, TARGETS), r"hidden must be \[B, d\]"),
    ("xent-weight-on-meta", "catalog_xent", "weight on the meta device",
     lambda: C.catalog_xent(H2, W.to(META), BIAS, TARGETS), "weight is on meta but hidden is on cpu"),
    ("xent-bwd-grad-shape", "catalog_xent_backward", "grad_loss [3] for B = 2",
     lambda: C.catalog_xent_backward(torch.ones(3), H2, W, BIAS, TARGETS, torch.zeros(2)),
     r"grad_loss must be \[B\] = \[2\]"),
    ("xent-bwd-lse-shape", "catalog_xent_backward", "lse [1] for B = 2",
     lambda: C.catalog_xent_backward(torch.ones(2), H2, W, BIAS, TARGETS, torch.zeros(1)),
     r"lse must be \[B\] = \[2\]"),
    ("wrapper-k-zero", "ops.seed_topk (Python wrapper)", "k = 0 through the wrapper",
     lambda: ops.seed_topk(H, W, BIAS, 0), r"k = 0 must be in \[1, V = 40\]"),
]:
    case(f"op-{id_}", f"op {op}", bad, lambda ctx, call=call: call(), RuntimeError, match, ext=True)


def double_backward(op: str):
    """A backward through the op's gradient (create_graph=True, as a gradient penalty would)."""
    def run(ctx):
        if op == "catalog_xent":
            hidden = H2.double().requires_grad_()
            out = ops.catalog_xent(hidden, W.double(), BIAS.double(), TARGETS)[0]
        else:
            args = denoiser_args()
            hidden = args["item_emb"].requires_grad_()
            out = ops.denoiser_input(*args.values()).pow(2)
        (grad,) = torch.autograd.grad(out.sum(), hidden, create_graph=True)
        grad.pow(2).sum().backward()
    return run


def gradients_of_every_output(ctx):
    """Each floating output's gradient equals the twin's: catalog_xent's loss and lse, seed_avg_probs,
    seed_topk's values (its ids and seed_target_rank's ranks are integers: they never require grad)."""
    def grads(fn):
        leaves = [t.double().requires_grad_() for t in (H, W, BIAS)]
        fn(*leaves).backward()
        return [t.grad for t in leaves]

    weights = torch.linspace(0.5, 1.5, 7, dtype=torch.float64)
    for ours, twin in [
        (lambda h, w, b: sum(o.sum() for o in ops.catalog_xent(h[:, 0], w, b, TARGETS)),
         lambda h, w, b: sum(o.sum() for o in ref.catalog_xent(h[:, 0], w, b, TARGETS))),
        (lambda h, w, b: ops.seed_avg_probs(h, w, b)[:, :7].sum(), lambda h, w, b: ref.seed_avg_probs(h, w, b)[:, :7].sum()),
        (lambda h, w, b: (ops.seed_topk(h, w, b, 7)[0] * weights).sum(),
         lambda h, w, b: (ref.seed_topk(h, w, b, 7)[0] * weights).sum()),
    ]:
        for got, want in zip(grads(ours), grads(twin)):
            torch.testing.assert_close(got, want)
    hidden = H.clone().requires_grad_()
    assert not ops.seed_topk(hidden, W, BIAS, 3)[1].requires_grad
    assert not ops.seed_target_rank(hidden, W, BIAS, TARGETS).requires_grad


for op in ("catalog_xent", "denoiser_input"):
    case(f"op-{op.replace('_', '-')}-double-backward", f"op {op} (autograd)",
         "a backward through its gradient (create_graph=True)", double_backward(op), RuntimeError,
         f"diffrec_ext.ops.{op} has no double backward \\(its gradient kernel is not differentiable\\): "
         f"differentiate through it once, or use the pure-PyTorch twin diffrec_ext.reference.{op}", ext=True)
case("op-gradients", "ops (autograd)", "backward through every floating output (catalog_xent's lse, seed_avg_probs, "
     "seed_topk's values)", gradients_of_every_output, None, ext=True,
     sees="accepted: the twins' gradients (gradcheck and gradgradcheck of the seed ops in tests/test_ops.py); "
          "integer outputs (top-k ids, ranks) never require grad")


# ------------------------------------------------------------------------------------------ data readers

def read(name: str, content, fmt: str = "auto", **options):
    def run(ctx):
        path = ctx.tmp / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
        return read_interactions(path, fmt, **options)
    return run


def load(name: str, content: str, **options):
    def run(ctx):
        path = ctx.tmp / name
        path.write_text(content)
        return load_dataset(path, **options)
    return run


R3 = "1::2::5::10\n1::3::4::11\n"  # two good MovieLens lines before the bad third one
INTER = "user_id:token\titem_id:token\ttimestamp:float\nu\ta\t1\n"
for id_, name, content, bad, match in [
    ("seq-item-text", "seq.txt", "1 2 3\n2 4 5\n3 4 x7\n", "non-numeric item id", "line 3: non-numeric item id 'x7'"),
    ("seq-user-text", "seq.txt", "1 2 3\n2 4 5\nu3 4 6\n", "non-numeric user id", "line 3: non-numeric user id 'u3'"),
    ("seq-commas", "seq.txt", "1 2 3\n2 4 5\n3,4,6\n", "commas instead of spaces", "line 3: wrong delimiter in '3,4,6'"),
    ("seq-tab", "seq.txt", "1 2 3\n2 4 5\n3\t4 6\n", "a tab instead of a space", "line 3: wrong delimiter: found a tab"),
    ("seq-no-items", "seq.txt", "1 2 3\n2 4 5\n3\n4 5 6\n", "a user without items (truncated line)",
     "line 3: truncated line: user 3 has no items"),
    ("seq-blank-line", "seq.txt", "1 2 3\n2 4 5\n\n4 5 6\n", "a blank line inside the file", "line 3: blank line"),
    ("seq-duplicate-user", "seq.txt", "1 2 3\n2 4 5\n1 6 7\n", "a user's second line (duplicate row)",
     "line 3: user 1 already has a sequence on line 1"),
    ("seq-id-overflow", "seq.txt", "1 2 3\n2 4 5\n3 4 99999999999999999999\n", "an id beyond 64 bits",
     "line 3: id 99999999999999999999 does not fit in 64 bits"),
    ("seq-bare-cr", "seq.txt", "1 2 3\r2 4 5\r3 4 6\r", "old Mac line endings (bare \\r)",
     r"line 1: carriage return \(\\r\) inside the line"),
    ("seq-nul-byte", "seq.txt", "1 2 3\n2 4 5\n3 4\x00 6\n", "a NUL byte in an id", "line 3: non-numeric item id '4\\\\x00'"),
    ("ml-truncated", "ratings.dat", R3 + "1::4::4\n", "a truncated ratings line",
     "line 3: truncated line: 3 of 4 '::'-separated fields"),
    ("ml-tab", "ratings.dat", R3 + "1\t4\t4\t12\n", "tabs in a '::' file", r"line 3: wrong delimiter: found '\\t'"),
    ("ml-extra-field", "ratings.dat", R3 + "1::4::4::12::0\n", "a fifth field", "line 3: wrong number of fields: 5 instead of 4"),
    ("ml-item-text", "ratings.dat", R3 + "1::M4::4::12\n", "non-numeric item id", "line 3: non-numeric item id 'M4'"),
    ("ml-rating-text", "ratings.dat", R3 + "1::4::four::12\n", "non-numeric rating", "line 3: non-numeric rating 'four'"),
    ("ml-rating-nan", "ratings.dat", R3 + "1::4::nan::12\n", "rating NaN", "line 3: rating 'nan' is not a finite number"),
    ("ml-rating-inf", "ratings.dat", R3 + "1::4::inf::12\n", "rating Inf", "line 3: rating 'inf' is not a finite number"),
    ("ml-time-float", "ratings.dat", R3 + "1::4::4::12.5\n", "fractional timestamp", "line 3: non-numeric timestamp '12.5'"),
    ("ml-time-overflow", "ratings.dat", R3 + "1::4::4::99999999999999999999\n", "a timestamp beyond 64 bits",
     "line 3: timestamp 99999999999999999999 does not fit in 64 bits"),
    ("ml-empty-field", "ratings.dat", R3 + "1::::4::12\n", "an empty item id", "line 3: empty item id"),
    ("udata-truncated", "u.data", "1\t2\t5\t10\n1\t3\t4\t11\n1\t4\t4\n", "a truncated u.data line",
     "line 3: truncated line: 3 of 4"),
    ("mlcsv-truncated", "ratings.csv", "userId,movieId,rating,timestamp\n1,2,5,10\n1,3,4\n", "a truncated ratings.csv line",
     "line 3: truncated line: 3 of 4"),
    ("ml-not-movielens", "ratings.dat", "1;2;5;10\n", "';' separated ratings", "line 1: not a MovieLens ratings line"),
    ("inter-truncated", "x.inter", INTER + "u\tb\n", "a truncated .inter line", "line 3: truncated line: 2 of 3"),
    ("inter-empty-item", "x.inter", INTER + "u\t\t2\n", "an empty item token", "line 3: empty item id"),
    ("inter-time-text", "x.inter", INTER + "u\tb\tlate\n", "non-numeric timestamp", "line 3: non-numeric timestamp 'late'"),
    ("inter-extra-field", "x.inter", "user_id:token\titem_id:token\nu\ta\nu\tb\tc\n", "an extra field",
     "line 3: wrong number of fields: 3 instead of 2"),
    ("inter-header-untyped", "x.inter", "user_id\titem_id:token\nu\ta\n", "a header field without ':type'",
     "line 1: header field 'user_id' is not 'name:type'"),
    ("inter-header-no-user", "x.inter", "user:token\titem_id:token\nu\ta\n", "no user_id column",
     "line 1: header has no 'user_id' field"),
    ("inter-header-twice", "x.inter", "user_id:token\titem_id:token\tuser_id:token\nu\ta\tv\n", "a column named twice",
     "line 1: header field 'user_id' appears twice"),
    ("inter-header-type", "x.inter", "user_id:token\titem_id:token\ttimestamp:token\nu\ta\t1\n",
     "timestamp typed as token", "line 1: header field 'timestamp:token' should have type 'float'"),
    ("csv-short-line", "log.csv", "user,item,timestamp\n1,2,3\n1,3\n", "a line with 2 of 3 fields",
     "line 3: wrong number of fields: 2 instead of 3"),
    ("csv-long-line", "log.csv", "user,item,timestamp\n1,2,3\n1,3,4,5\n", "a line with 4 of 3 fields",
     "line 3: wrong number of fields: 4 instead of 3"),
    ("csv-time-text", "log.csv", "user,item,timestamp\n1,2,3\n1,3,soon\n", "a timestamp that is neither number nor date",
     "line 3: column 'timestamp' is not a number or ISO date: 'soon'"),
    ("csv-time-inf", "log.csv", "user,item,timestamp\n1,2,3\n1,3,inf\n", "an infinite timestamp",
     "line 3: column 'timestamp' is not a number or ISO date: 'inf'"),
    ("csv-missing-user", "log.csv", "user,item,timestamp\n1,2,3\n,3,4\n", "an empty user", "line 3: column 'user' is missing"),
    ("csv-no-column", "log.csv", "who,item,timestamp\n1,2,3\n", "no 'user' column", r"line 1: no column \['user'\]"),
    ("csv-semicolons", "log.csv", "user;item;timestamp\n1;2;3\n", "';' instead of ','",
     r"line 1: no column \['user', 'item', 'timestamp'\] \(columns: \['user;item;timestamp'\]\)"),
    ("csv-unclosed-quote", "log.csv", 'user,item,timestamp\n1,2,3\n1,"3,4\n', "an unclosed quote",
     "line 3: wrong number of fields: 2 instead of 3"),
    ("empty-file", "seq.txt", "", "an empty file", "file is empty"),
    ("blank-file", "seq.txt", "\n \n", "a file of blank lines", "file is empty"),
    ("header-only-csv", "ratings.csv", "userId,movieId,rating,timestamp\n", "a header without rows",
     "has a header but no interactions"),
    ("header-only-inter", "x.inter", "user_id:token\titem_id:token\n", "a header without rows",
     "has a header but no interactions"),
    ("not-gzip", "seq.txt.gz", "1 2 3\n", "a .gz name on plain text", "is not valid gzip data"),
    ("not-utf8", "seq.txt", b"1 2 3\n2 \xff\xfe 4\n", "bytes that are not UTF-8", "line 2: is not valid UTF-8"),
]:
    case(f"data-{id_}", "reader read_interactions", bad, read(name, content), DataFormatError, match)


def truncated_gzip(ctx):
    body = gzip.compress("".join(f"{u} {u + 1} {u + 2} {u + 3}\n" for u in range(1, 2000)).encode())
    path = ctx.tmp / "seq.txt.gz"
    path.write_bytes(body[: len(body) // 2])
    return read_interactions(path)


case("data-truncated-gzip", "reader read_interactions", "a gzip file cut in the middle", truncated_gzip,
     DataFormatError, r"line \d+: gzip stream is truncated: the data ends inside this line")
case("data-unknown-format", "reader read_interactions", "fmt='xml'", read("a.txt", "1 2 3\n", fmt="xml"),
     ValueError, "unknown format 'xml'")


def without_parquet_engine(run):
    """`run` in a process where neither pyarrow nor fastparquet can be imported."""
    def wrapped(ctx):
        from unittest import mock

        with mock.patch.dict(sys.modules, {"pyarrow": None, "fastparquet": None}):
            return run(ctx)
    return wrapped


def parquet(frame: dict, **options):
    """A Parquet file of `frame` (columns as lists; needs pyarrow, which the test extra installs), read."""
    def run(ctx):
        import pandas as pd

        pytest.importorskip("pyarrow", reason="writing the Parquet file needs pyarrow (pip install '.[test]')")
        path = ctx.tmp / "log.parquet"
        pd.DataFrame(frame).to_parquet(path)
        return read_interactions(path, **options)
    return run


case("data-parquet-no-engine", "reader read_interactions", "a Parquet file without pyarrow",
     without_parquet_engine(read("log.parquet", b"PAR1 not really parquet")), ImportError,
     r"needs a Parquet engine: pip install pyarrow \(or pip install 'diffrec-ext\[parquet\]'\)")
for id_, frame, bad, match in [
    ("list-user", {"user": [[1, 2], [3]], "item": [1, 2], "timestamp": [1, 2]}, "a list-typed user column",
     r"row 1: column 'user' holds ndarray '\[1 2\]' \(mixed values\): ids must be all integers or all strings"),
    ("list-timestamp", {"user": [1, 1], "item": [1, 2], "timestamp": [[1, 2], [3]]}, "a list-typed timestamp column",
     r"row 1: column 'timestamp' is not a number or ISO date: ndarray '\[1 2\]'"),
    ("struct-item", {"user": [1, 1], "item": [{"a": 1}, {"a": 2}], "timestamp": [1, 2]}, "a struct-typed item column",
     r"row 1: column 'item' holds dict \"\{'a': 1\}\" \(mixed values\)"),
    ("bool-user", {"user": [True, False], "item": [1, 2], "timestamp": [1, 2]}, "a boolean user column",
     r"column 'user' is boolean \(dtype bool\); expected ids"),
    ("bool-timestamp", {"user": [1, 1], "item": [1, 2], "timestamp": [True, False]}, "a boolean timestamp column",
     r"column 'timestamp' is boolean \(dtype bool\); expected numbers"),
    ("bytes-user", {"user": [b"a", b"b"], "item": [1, 2], "timestamp": [1, 2]}, "a binary user column",
     r"row 1: column 'user' holds bytes \"b'a'\" \(bytes values\)"),
    ("date-item", {"user": [1, 1], "item": [datetime.datetime(2020, 1, d) for d in (1, 2)],
                   "timestamp": [1, 2]}, "a date-typed item column", r"row 1: column 'item' holds Timestamp"),
]:
    case(f"data-parquet-{id_}", "reader read_interactions", bad, parquet(frame), DataFormatError, match)
case("data-csv-bool-user", "reader read_interactions", "a user column of True/False",
     read("log.csv", "user,item,timestamp\nTrue,2,3\nFalse,3,4\n"), DataFormatError,
     r"log\.csv: column 'user' is boolean \(dtype bool\); expected ids")
case("data-directory", "reader read_interactions", "a directory instead of a file",
     lambda ctx: read_interactions(ctx.tmp, "sequence"), IsADirectoryError, "Is a directory")

# preprocessing
case("prep-too-short", "preprocess (load_dataset)", "users with 2 interactions and k_core = 1 (leave-one-out needs 3)",
     load("seq.txt", "1 2 3 4\n2 3 4 5\n3 4 5\n", k_core=1), ValueError,
     r"1 users have fewer than 3 interactions after filtering \(e\.g\. \[3\]\), too few for a leave-one-out "
     r"split; use k_core >= 3")
case("prep-k-core-empties", "preprocess (load_dataset)", "a k-core that removes every user",
     load("seq.txt", "1 2 3 4\n2 3 4 5\n", k_core=50), ValueError, r"the k-core filter \(users >= 50, items >= 50\) "
     "removed everything")
case("prep-min-rating-no-column", "preprocess (load_dataset)", "min_rating on a file without ratings",
     load("seq.txt", "1 2 3 4\n", k_core=1, min_rating=4), ValueError, "min_rating needs a 'rating' column")
case("prep-min-rating-none-left", "preprocess (load_dataset)", "min_rating above every rating",
     load("ratings.dat", "1::2::3::10\n1::3::3::11\n1::4::3::12\n", k_core=1, min_rating=4), ValueError,
     "no interaction has rating >= 4")


def duplicate_rows(ctx):
    dataset = load("ratings.dat", "1::2::5::10\n1::2::5::10\n1::3::4::11\n1::4::4::12\n", k_core=1)(ctx)
    assert dataset.num_actions == 4 and dataset.sequence(0).tolist() == [1, 1, 2, 3]


case("prep-duplicate-rows", "preprocess (load_dataset)", "identical (user, item, time) rows", duplicate_rows, None,
     sees="accepted: kept as repeat interactions (each row counts, as in the paper's data; a duplicate user "
          "line of a sequence file is an error, see data-seq-duplicate-user)")


def crlf_and_trailing_blank_lines(ctx):
    table = read("seq.txt", "1 2 3\r\n2 3 4\r\n\r\n\n")(ctx)
    assert table["item"].tolist() == [2, 3, 3, 4]


def byte_order_marks(ctx):
    """Every text format reads a file with a UTF-8 BOM as the same file without it."""
    for name, content in (("seq.txt", "1 2 3\n2 4 5\n"), ("x.inter", INTER), ("ratings.dat", R3), ("u.data", "1\t2\t5\t10\n"),
                          ("log.csv", "user,item,timestamp\n1,2,3\n"), ("ratings.csv", "userId,movieId,rating,timestamp\n1,2,5,10\n")):
        plain = read(name, content)(ctx)
        marked = read(name, b"\xef\xbb\xbf" + content.encode())(ctx)
        assert plain.equals(marked), name
        gzipped = read(name + ".gz", gzip.compress(b"\xef\xbb\xbf" + content.encode()))(ctx)
        assert plain.equals(gzipped), name


case("data-bom", "reader read_interactions", "a UTF-8 byte-order mark (sequence, .inter, MovieLens, u.data, CSV files)",
     byte_order_marks, None, sees="accepted in every text format, plain or gzipped: the mark is skipped")
case("data-crlf", "reader read_interactions", "Windows line endings and trailing blank lines",
     crlf_and_trailing_blank_lines, None, sees="accepted: read as ordinary lines")

# ------------------------------------------------------------------------------------------ inference


def model_with_nan(ctx, where="out"):
    model = copy.deepcopy(ctx.model())
    with torch.no_grad():
        (model.out.weight if where == "out" else model.item_emb.weight)[3, 0] = float("nan")
    return model


def T(*rows):
    return torch.tensor(rows, dtype=torch.int64)


for id_, fn, bad, error, match in [  # where: "inference recommend" unless the id says otherwise
    ("k-zero", lambda ctx: recommend(ctx.model(), [[1, 2]], k=0), "k = 0", ValueError,
     r"k must be an int in \[1, num_items = \d+\], got 0"),
    ("k-above-V", lambda ctx: recommend(ctx.model(), [[1, 2]], k=10_000), "k above the catalog size", ValueError,
     r"k must be an int in \[1, num_items = \d+\], got 10000"),
    ("k-above-left", lambda ctx: recommend(ctx.model(), [list(range(1, ctx.model().num_items + 1))], k=1),
     "k above the items left once the history is excluded", ValueError,
     r"history 0: k = 1 exceeds the 0 items left after excluding its own items"),
    ("num-samples-zero", lambda ctx: recommend(ctx.model(), [[1]], num_samples=0), "num_samples = 0",
     ValueError, "num_samples must be a positive int, got 0"),
    ("method", lambda ctx: recommend(ctx.model(), [[1]], algorithm="ddim"), "algorithm 'ddim'", ValueError,
     r"algorithm must be one of \('alg3', 'alg2'\), got 'ddim'"),
    ("stride-zero", lambda ctx: recommend(ctx.model(), [[1]], algorithm="alg2", stride=0), "Alg. 2 stride 0", ValueError,
     r"stride must be an int in \[1, N = 20\], got 0"),
    ("batch-size-zero", lambda ctx: recommend(ctx.model(), [[1]], batch_size=0), "batch_size = 0", ValueError,
     "batch_size must be a positive int, got 0"),
    ("id-above-V", lambda ctx: recommend(ctx.model(), [[1, 2], [3, 10_000]]), "dense id 10000 in a history",
     ValueError, r"histories\[1\]\[1\] = 10000 is out of range: dense item ids lie in \[1, \d+\]"),
    ("id-negative", lambda ctx: recommend(ctx.model(), [[1, -2]]), "dense id -2 in a history", ValueError,
     r"histories\[0\]\[1\] = -2 is out of range"),
    ("id-text", lambda ctx: recommend(ctx.model(), [[1, "a"]]), "a string in a dense history", ValueError,
     r"histories\[0\]\[1\] = 'a' is not an integer item id"),
    ("id-fraction", lambda ctx: recommend(ctx.model(), [[1, 2.5]]), "2.5 in a dense history", ValueError,
     r"histories\[0\]\[1\] = 2.5 is not an item id"),
    ("history-3d", lambda ctx: recommend(ctx.model(), torch.ones(2, 2, 2, dtype=torch.int64)),
     "a [2, 2, 2] history tensor", ValueError, r"a history table must be 2-D \[users, length\], got shape \(2, 2, 2\)"),
    ("history-float", lambda ctx: target_ranks(ctx.model(), torch.ones(2, 3), T(1, 2)), "a float history tensor",
     ValueError, "histories must hold integer item ids, got dtype torch.float32"),
    ("history-tensor-range", lambda ctx: target_ranks(ctx.model(), T([1, 2, 999], [1, 2, 3]), T(1, 2)),
     "id 999 in a history tensor", ValueError, r"histories\[0\]\[2\] = 999 is out of range"),
    ("target-zero", lambda ctx: target_ranks(ctx.model(), T([1, 2], [2, 3]), T(1, 0)), "target 0 (padding)",
     ValueError, r"targets\[1\] = 0 is out of range: targets must be item ids in \[1, \d+\]"),
    ("target-above-V", lambda ctx: target_ranks(ctx.model(), T([1, 2], [2, 3]), T(1, 999)), "target 999",
     ValueError, r"targets\[1\] = 999 is out of range"),
    ("targets-2d", lambda ctx: target_ranks(ctx.model(), T([1, 2], [2, 3]), T([1], [2])), "targets [2, 1]",
     ValueError, r"targets must be 1-D, got shape \(2, 1\)"),
    ("targets-count", lambda ctx: target_ranks(ctx.model(), T([1, 2], [2, 3]), T(1)), "2 histories, 1 target",
     ValueError, "2 histories for 1 targets"),
    ("seen-offsets-length", lambda ctx: target_ranks(ctx.model(), T([1, 2], [2, 3]), T(1, 2), seen_offsets=[0, 1],
                                                      seen_items=[1]),
     "seen_offsets with 2 entries for 2 users", ValueError, r"seen_offsets must have 3 entries, got \(2,\)"),
    ("seen-offsets-decreasing", lambda ctx: target_ranks(ctx.model(), T([1, 2], [2, 3]), T(1, 2),
                                                          seen_offsets=[0, 2, 1], seen_items=[1, 2]),
     "decreasing seen_offsets", ValueError, r"seen_offsets must rise from 0 to len\(seen_items\) = 2"),
    ("seen-offsets-beyond", lambda ctx: target_ranks(ctx.model(), T([1, 2], [2, 3]), T(1, 2),
                                                      seen_offsets=[0, 1, 5], seen_items=[1, 2]),
     "seen_offsets ending past seen_items", ValueError, r"seen_offsets must rise .* ending at 5"),
    ("seen-item-range", lambda ctx: target_ranks(ctx.model(), T([1, 2], [2, 3]), T(1, 2),
                                                  seen_offsets=[0, 1, 2], seen_items=[1, 999]),
     "seen item 999", ValueError, r"seen_items\[1\] = 999 is out of range"),
    ("seen-half", lambda ctx: target_ranks(ctx.model(), T([1, 2]), T(1), seen_offsets=[0, 1]),
     "seen_offsets without seen_items", ValueError, "give both seen_offsets and seen_items, or neither"),
    ("noise-shape", lambda ctx: predict_h0(ctx.model(), T([1, 2, 3, 4, 5, 6, 7, 0]), num_samples=2,
                                           noise=torch.zeros(1, 3, 1, 16)),
     "Alg. 3 noise of the wrong shape", ValueError, r"noise must be \[B, S, K, d\] = \(1, 2, 1, 16\)"),
    ("item-map-length", lambda ctx: Recommender(ctx.model(), [1, 2, 3]), "an item map of 3 ids for the model",
     ValueError, r"3 item ids for a model of \d+ items"),
    ("nan-output-weight-recommend", lambda ctx: recommend(model_with_nan(ctx), [[1, 2]], k=3),
     "a model whose output layer holds NaN", FloatingPointError, "NaN/Inf"),
    ("nan-item-embedding", lambda ctx: recommend(model_with_nan(ctx, "item"), [[3, 2]], k=3),
     "a history through a NaN item embedding", FloatingPointError,
     r"the model predicts NaN/Inf for histories \[0\]: check its weights"),
    ("nan-output-weight-ranks", lambda ctx: target_ranks(model_with_nan(ctx), T([1, 2]), T(1)),
     "ranking with a NaN output layer", FloatingPointError, "the model's output weight holds NaN/Inf"),
]:
    where = {"history-float": "target_ranks", "history-tensor-range": "target_ranks", "noise-shape": "predict_h0",
             "item-map-length": "Recommender", "nan-output-weight-ranks": "target_ranks"}.get(id_)
    if where is None:
        where = "target_ranks" if id_.startswith(("target", "seen")) else "recommend"
    case(f"inference-{id_}", f"inference {where}", bad, fn, error, match)


def empty_history(ctx):
    ids, scores = recommend(ctx.model(), [[]], k=3)
    assert ids.shape == (1, 3) and bool(torch.isfinite(scores).all())


def long_history(ctx):
    model = ctx.model()
    history = [int(i) % model.num_items + 1 for i in range(3 * model.max_len)]
    full = recommend(model, [history], k=5, exclude_seen=False)
    recent = recommend(model, [history[-(model.max_len - 1):]], k=5, exclude_seen=False)
    assert torch.equal(full[0], recent[0])


def unknown_original_ids(ctx):
    rec = Recommender.from_checkpoint(ctx.run)
    return rec.recommend([rec.item_ids[0], "no-such-item", rec.item_ids[1]], k=3)


def histories_of_every_container(ctx):
    """A tensor, a numpy array, a tuple: the same history as the list, for Recommender and engine."""
    import numpy as np

    rec = Recommender.from_checkpoint(ctx.run)
    engine = InferenceEngine.from_checkpoint(ctx.run, device="cpu")
    items = rec.item_ids[:3]
    expected = [r.item for r in rec.recommend(list(items), k=5)]
    assert not set(items) & set(expected)  # the history was read: its items are excluded
    for history in (torch.tensor(items), np.array(items), tuple(items)):
        assert [r.item for r in rec.recommend(history, k=5)] == expected
        assert engine.recommend([history], k=5).items == engine.recommend([list(items)], k=5).items


def rec_call(**kwargs):
    def run(ctx):
        rec = Recommender.from_checkpoint(ctx.run)
        history = kwargs.pop("history", rec.item_ids[:2])
        return rec.recommend(history, **kwargs)
    return run


def engine_call(histories, **kwargs):
    return lambda ctx: InferenceEngine.from_checkpoint(ctx.run, device="cpu").recommend(histories, **kwargs)


for id_, where, fn, bad, match in [
    ("history-string", "Recommender.recommend", rec_call(history="356"), "the history '356' (a string)",
     r"history must be a list, tuple, 1-D array or 1-D integer tensor of item ids, got str '356'"),
    ("history-number", "Recommender.recommend", rec_call(history=3), "the history 3 (a number)",
     r"history must be a list, tuple, .* got int 3"),
    ("history-float-id", "Recommender.recommend", rec_call(history=[1, 2.0]), "the id 2.0 in a history",
     r"history\[1\] = 2\.0 is not an item id \(an int, or a str for original ids\)"),
    ("history-bool-id", "Recommender.recommend", rec_call(history=[True, 2]), "the id True in a history",
     r"history\[0\] = True is not an item id"),
    ("history-nested", "Recommender.recommend", rec_call(history=[[1, 2], 3]), "a list inside a history",
     r"history\[0\] = \[1, 2\] is not an item id"),
    ("history-tensor-2d", "Recommender.recommend", rec_call(history=torch.tensor([[1, 2]])), "a [1, 2] tensor",
     r"history must be a 1-D integer tensor of item ids, got a torch.int64 tensor of shape \(1, 2\)"),
    ("history-tensor-float", "Recommender.recommend", rec_call(history=torch.tensor([1.0, 2.0])),
     "a float tensor as a history", r"history must be a 1-D integer tensor of item ids, got a torch.float32 tensor"),
    ("k-none", "Recommender.recommend", rec_call(k=None), "k = None",
     r"k must be an int in \[1, num_items = \d+\], got None"),
    ("k-bool", "Recommender.recommend", rec_call(k=True), "k = True", r"k must be an int in .*, got True"),
    ("exclude-seen-none", "Recommender.recommend", rec_call(exclude_seen=None), "exclude_seen = None",
     "exclude_seen must be True or False, got None"),
    ("seed-text", "Recommender.recommend", rec_call(seed="0"), "seed = '0'", "seed must be an int, got '0'"),
    ("engine-history-string", "InferenceEngine.recommend", engine_call(["356"]), "histories = ['356']",
     r"histories\[0\] must be a list, tuple, .* got str '356'"),
    ("engine-history-nested", "InferenceEngine.recommend", engine_call([[1, [2]]]), "histories = [[1, [2]]]",
     r"histories\[0\]\[1\] = \[2\] is not an item id"),
    ("engine-flat-history", "InferenceEngine.recommend", engine_call([1, 2, 3]),
     "one flat history [1, 2, 3] instead of a list of histories", r"histories\[0\] must be a list, .* got int 1"),
    ("engine-k-none", "InferenceEngine.recommend", engine_call([[1, 2, 3]], k=None), "k = None",
     r"k must be an int in \[1, num_items = \d+\], got None"),
    ("engine-dense-k-none", "InferenceEngine.recommend_dense",
     lambda ctx: InferenceEngine.from_checkpoint(ctx.run, device="cpu").recommend_dense([[1, 2]], k=None),
     "k = None", r"k must be an int in \[1, num_items = \d+\], got None"),
    ("engine-seed-none", "InferenceEngine.recommend", engine_call([[1, 2, 3]], seed=None), "seed = None",
     "seed must be an int, got None"),
    ("engine-unknown-ids", "InferenceEngine.recommend", engine_call([[1, 2], [3, 99999]]), "an id the model never saw",
     r"history 1: 1 unknown item id\(s\): 99999"),
]:
    case(f"inference-{id_}", f"inference {where}", bad, fn, ValueError, match)


case("inference-empty-history", "inference recommend", "an empty history", empty_history, None,
     sees="accepted: the ranking of an all-padding input (the model's prior); the CLI warns "
          "\"empty history: the ranking is the model's prior\"")
case("inference-long-history", "inference recommend", "a history longer than T - 1", long_history, None,
     sees="accepted: the most recent T - 1 items are used (the same ranking as the truncated history); "
          "with exclude_seen every item of the full history is excluded")
case("inference-unknown-original-ids", "inference Recommender.recommend", "original item ids the model never saw",
     unknown_original_ids, UnknownItemsError, r"history: 1 unknown item id\(s\): 'no-such-item'")
case("inference-history-containers", "inference Recommender.recommend, InferenceEngine.recommend",
     "a history as a 1-D int tensor, a numpy array or a tuple", histories_of_every_container, None,
     sees="accepted: read as the same list of item ids (the same top-k as the list)")


def model_ids_wrong_width(ctx):
    model = ctx.model()
    return model(T([1, 2, 3]))


case("model-ids-width", "model DSR.forward", "ids [1, 3] for T = 8", model_ids_wrong_width, ValueError,
     r"ids must be \[B, T = 8\], got shape \(1, 3\)")
case("model-history-1d", "model DSR.build_input", "a 1-D history", lambda ctx: ctx.model().build_input(T(1, 2)),
     ValueError, r"history must be \[B, H\], got shape \(2,\)")


# ------------------------------------------------------------------------------------------ checkpoints

def corrupt(change: Callable[[Path], None]):
    def run(ctx):
        directory = ctx.copy_checkpoint()
        change(directory)
        return ckpt.load_model(directory)
    return run


def edit_json(name: str, edit: Callable[[Any], Any]):
    def change(directory: Path):
        path = directory / name
        value = json.loads(path.read_text())
        path.write_text(json.dumps(edit(value)))
    return change


def edit_config(**changes):
    def edit(meta):
        meta["config"].update(changes)
        return meta
    return edit_json(ckpt.CONFIG_FILE, edit)


def edit_tensors(edit: Callable[[dict], None]):
    def change(directory: Path):
        path = directory / ckpt.MODEL_FILE
        tensors = load_file(path)
        edit(tensors)
        save_file(tensors, path)
    return change


def truncate(name: str, keep: float = 0.5):
    def change(directory: Path):
        data = (directory / name).read_bytes()
        (directory / name).write_bytes(data[: int(len(data) * keep)])
    return change


def flip_bit(name: str):
    """Flips one bit in the last byte of the file: inside the data of its last tensor."""
    def change(directory: Path):
        data = bytearray((directory / name).read_bytes())
        data[-1] ^= 0x01
        (directory / name).write_bytes(bytes(data))
    return change


def set_item(name, value):
    def edit(tensors):
        tensors[name] = value(tensors[name])
    return edit


for id_, bad, change, match in [
    ("d-changed", "dim 16 -> 32 in config.json", edit_config(dim=32),
     r"model\.safetensors: tensor \S+ has shape \([\d, ]+\), the model expects \([\d, ]+\)"),
    ("layers-changed", "layers 1 -> 2 in config.json", edit_config(layers=2),
     r"model\.safetensors: missing tensors \['layers\.1\."),
    ("max-len-changed", "max_len 8 -> 9 in config.json", edit_config(max_len=9),
     r"tensor pos_emb has shape \(8, 16\), the model expects \(9, 16\)"),
    ("num-items-changed", "num_items + 1 in config.json", edit_json(ckpt.CONFIG_FILE, lambda m: {**m, "num_items": m["num_items"] + 1}),
     r"items\.json must list \d+ item ids"),
    ("item-map-short", "items.json one id short", edit_json(ckpt.ITEMS_FILE, lambda items: items[:-1]),
     r"items\.json must list \d+ item ids"),
    ("item-map-not-list", "items.json holding an object", edit_json(ckpt.ITEMS_FILE, lambda items: {"a": 1}),
     r"items\.json must list \d+ item ids"),
    ("config-not-json", "config.json that is not JSON", lambda d: (d / ckpt.CONFIG_FILE).write_text("{dim: 16"),
     r"config\.json is not valid JSON"),
    ("config-format", "an unknown checkpoint format", edit_json(ckpt.CONFIG_FILE, lambda m: {**m, "format": "v0"}),
     "unknown checkpoint format 'v0'"),
    ("config-unknown-key", "an unknown config key", edit_config(hidden_units=3),
     r"config\.json: invalid model config: unknown config keys \['hidden_units'\]"),
    ("config-bad-value", "dim = 'x' in config.json", edit_config(dim="x"),
     r"config\.json: invalid model config: dim must be int, got 'x'"),
    ("config-not-mapping", "config = [] in config.json", edit_json(ckpt.CONFIG_FILE, lambda m: {**m, "config": []}),
     r"invalid model config: config must be a mapping, got list"),
    ("weights-truncated", "model.safetensors cut in half", truncate(ckpt.MODEL_FILE),
     r"model\.safetensors is not a valid safetensors file"),
    ("weights-empty", "an empty model.safetensors", truncate(ckpt.MODEL_FILE, 0.0),
     r"model\.safetensors is not a valid safetensors file"),
    ("weights-missing-tensor", "pos_emb removed", edit_tensors(lambda t: t.pop("pos_emb")),
     r"missing tensors \['pos_emb'\], unexpected tensors \[\]"),
    ("weights-extra-tensor", "an extra tensor", edit_tensors(lambda t: t.update(extra=torch.zeros(1))),
     r"missing tensors \[\], unexpected tensors \['extra'\]"),
    ("weights-shape", "pos_emb of shape [9, 16]", edit_tensors(set_item("pos_emb", lambda x: torch.zeros(9, 16))),
     r"tensor pos_emb has shape \(9, 16\), the model expects \(8, 16\)"),
    ("weights-dtype", "pos_emb stored as float64", edit_tensors(set_item("pos_emb", lambda x: x.double())),
     "tensor pos_emb has dtype torch.float64, the model expects torch.float32"),
    ("weights-nan", "a NaN in pos_emb", edit_tensors(set_item("pos_emb", lambda x: x.index_fill(0, T(2), float("nan")))),
     "tensor pos_emb holds NaN or Inf values"),
    ("items-file-missing", "items.json deleted", lambda d: (d / ckpt.ITEMS_FILE).unlink(),
     r"missing checkpoint file \S+items\.json"),
    ("weights-file-missing", "model.safetensors deleted", lambda d: (d / ckpt.MODEL_FILE).unlink(),
     r"is neither a checkpoint directory \(model\.safetensors \+ config\.json\) nor a run directory with best\.json"),
    ("heads-changed", "heads 2 -> 4 in config.json (no tensor shape changes)", edit_config(heads=4),
     r"config\.json: heads = 4, but model\.safetensors was saved with heads = 2: the config no longer describes "
     r"these weights"),
    ("num-steps-changed", "num_steps 20 -> 5 in config.json", edit_config(num_steps=5),
     r"config\.json: num_steps = 5, but model\.safetensors was saved with num_steps = 20"),
    ("schedule-changed", "schedule sqrt -> cosine in config.json", edit_config(schedule="cosine"),
     r"config\.json: schedule = \"cosine\", but model\.safetensors was saved with schedule = \"sqrt\""),
    ("causal-changed", "causal true -> false in config.json (mode prefix, which allows it)",
     edit_config(causal=False, mode="prefix", step_embedding="target"),
     r"config\.json: causal = false, but model\.safetensors was saved with causal = true"),
    ("weights-bit-flip", "one bit flipped inside a tensor of model.safetensors", flip_bit(ckpt.MODEL_FILE),
     r"model\.safetensors: its sha256 \w+\.\.\. differs from the \w+\.\.\. recorded in config\.json when it was "
     r"saved: the file was modified or corrupted"),
    ("weights-resaved", "model.safetensors rewritten with the same tensors (sha256 no longer recorded)",
     edit_tensors(lambda t: None), r"model\.safetensors: its sha256 \w+\.\.\. differs from the"),
    ("config-list", "config.json holding a JSON list", lambda d: (d / ckpt.CONFIG_FILE).write_text("[1, 2]"),
     r"config\.json must hold a JSON object, got a list"),
    ("items-duplicate", "items.json listing one id twice", edit_json(ckpt.ITEMS_FILE, lambda items: [items[1]] + items[1:]),
     r"items\.json: entry 1 = \S+ repeats entry 0 = \S+: item ids must be unique"),
    ("items-same-id-as-text", "items.json holding one id as a number and as text (2 and \"2\")",
     edit_json(ckpt.ITEMS_FILE, lambda items: [str(items[1])] + items[1:]),
     r"items\.json: entry 1 = \d+ repeats entry 0 = \"\d+\": item ids must be unique"),
    ("items-list-entry", "an entry [1, 2] in items.json", edit_json(ckpt.ITEMS_FILE, lambda items: items[:2] + [[1, 2]] + items[3:]),
     r"items\.json: entry 2 = \[1, 2\] is not an item id \(an int or a string\)"),
    ("items-null-entry", "an entry null in items.json", edit_json(ckpt.ITEMS_FILE, lambda items: [None] + items[1:]),
     r"items\.json: entry 0 = null is not an item id"),
    ("items-object-entry", "an entry {} in items.json", edit_json(ckpt.ITEMS_FILE, lambda items: [{}] + items[1:]),
     r"items\.json: entry 0 = \{\} is not an item id"),
    ("items-bool-entry", "an entry true in items.json", edit_json(ckpt.ITEMS_FILE, lambda items: [True] + items[1:]),
     r"items\.json: entry 0 = true is not an item id"),
]:
    case(f"ckpt-{id_}", "checkpoint load_model", bad, corrupt(change), CheckpointError, match)


def without_integrity_records(ctx):
    """A checkpoint as saved before the sha256 and architecture records: loads with a warning,
    and resave() adds the records."""
    directory = ctx.copy_checkpoint()
    edit_json(ckpt.CONFIG_FILE, lambda meta: {k: v for k, v in meta.items() if k != "sha256"})(directory)
    tensors = load_file(directory / ckpt.MODEL_FILE)
    save_file(tensors, directory / ckpt.MODEL_FILE, metadata={"format": ckpt.FORMAT})
    with pytest.warns(UserWarning, match="has no integrity records .* diffrec_ext.checkpoint.resave"):
        old = ckpt.load_model(directory)[0]
    ckpt.resave(directory)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        new = ckpt.load_model(directory)[0]
    assert all(torch.equal(a, b) for a, b in zip(old.state_dict().values(), new.state_dict().values()))
    edit_config(heads=4)(directory)
    with pytest.raises(CheckpointError, match="heads = 4, but model.safetensors was saved with heads = 2"):
        ckpt.load_model(directory)


case("ckpt-no-integrity-records", "checkpoint load_model", "a checkpoint saved before the sha256/architecture records",
     without_integrity_records, None,
     sees="accepted with a UserWarning: \"<dir> has no integrity records (saved before diffrec-ext recorded them): "
          "its config and tensors are checked against each other's shapes only. To add them, load it and save it "
          "again: diffrec_ext.checkpoint.resave(path)\"; after resave() the records are checked")


def broken_pointer(content: str | None, which="best"):
    def run(ctx):
        run_dir = ctx.copy_run()
        pointer = run_dir / (ckpt.BEST_POINTER if which == "best" else ckpt.LAST_POINTER)
        if content is None:  # the pointer's epoch directory is gone
            shutil.rmtree(run_dir / json.loads(pointer.read_text())["checkpoint"])
        else:
            pointer.write_text(content)
        return ckpt.load_model(run_dir, which=which)
    return run


case("ckpt-pointer-dangling", "checkpoint load_model (run directory)", "best.json naming a deleted epoch",
     broken_pointer(None), CheckpointError, r"best\.json points to \S+epoch-\d+, which is not a complete checkpoint")
case("ckpt-pointer-garbage", "checkpoint load_model (run directory)", "best.json = {\"x\": 1}",
     broken_pointer('{"x": 1}'), CheckpointError, r"best\.json must hold \{\"checkpoint\": \"<epoch directory>\"\}")
case("ckpt-pointer-escape", "checkpoint load_model (run directory)", "best.json naming ../elsewhere",
     broken_pointer('{"checkpoint": "../elsewhere"}'), CheckpointError, r"best\.json must hold")
case("ckpt-pointer-not-json", "checkpoint load_model (run directory)", "last.json that is not JSON",
     broken_pointer("{", which="last"), CheckpointError, r"last\.json is not valid JSON")
case("ckpt-no-path", "checkpoint load_model", "a path that does not exist",
     lambda ctx: ckpt.load_model(ctx.tmp / "nowhere"), CheckpointError, r"checkpoint path \S+nowhere does not exist")
case("ckpt-not-a-checkpoint", "checkpoint load_model", "a directory without checkpoint files",
     lambda ctx: ckpt.load_model(ctx.tmp), CheckpointError, "is neither a checkpoint directory")


# resume
def resume(change: Callable[[Path, Path], None] | None = None, **config_changes):
    def run(ctx):
        run_dir = ctx.copy_run()
        last = ckpt.resolve(run_dir, "last")
        if change is not None:
            change(run_dir, last)
        changes = dict(config_changes)
        dataset = ctx.dataset()
        if changes.pop("other_dataset", False):  # the same file without its first user
            table = read_interactions(ctx.data)
            dataset = preprocess(table[table["user"] != table["user"].min()], "tiny", k_core=2)
        config = ctx.config().replace(**changes)
        return train(config, dataset, run_dir, resume=True, progress=False, log=None)
    return run


def drop_state_tensor(name):
    """A state written without `name` (its sha256 recorded as if it had been saved that way)."""
    def change(run_dir, last):
        tensors = load_file(last / ckpt.STATE_TENSORS_FILE)
        del tensors[name]
        save_file(tensors, last / ckpt.STATE_TENSORS_FILE)
        state = json.loads((last / ckpt.STATE_FILE).read_text())
        state["sha256"] = {ckpt.STATE_TENSORS_FILE: hashlib.sha256((last / ckpt.STATE_TENSORS_FILE).read_bytes()).hexdigest()}
        (last / ckpt.STATE_FILE).write_text(json.dumps(state))
    return change


def edit_state(edit):
    def change(run_dir, last):
        state = json.loads((last / ckpt.STATE_FILE).read_text())
        edit(state)
        (last / ckpt.STATE_FILE).write_text(json.dumps(state))
    return change


case("resume-config-changed", "train resume", "resuming with dim 16 -> 32", resume(dim=32), ConfigError,
     r"cannot resume \S+: config differs in \['dim'\]")
case("resume-other-dataset", "train resume", "resuming on a different dataset", resume(other_dataset=True),
     ConfigError, r"cannot resume \S+: it was trained on a different dataset")
case("resume-state-tensor-missing", "train resume", "state.safetensors without rng.steps",
     resume(drop_state_tensor("rng.steps")), CheckpointError, r"its training state lacks \['rng\.steps'\]")
case("resume-state-bit-flip", "train resume", "one bit flipped inside a tensor of state.safetensors",
     resume(lambda run_dir, last: flip_bit(ckpt.STATE_TENSORS_FILE)(last)), CheckpointError,
     r"state\.safetensors: its sha256 \w+\.\.\. differs from the \w+\.\.\. recorded in state\.json when it was "
     r"saved: the file was modified or corrupted")
case("resume-state-truncated", "train resume", "state.safetensors cut in half",
     resume(lambda run_dir, last: truncate(ckpt.STATE_TENSORS_FILE)(last)), CheckpointError,
     r"state\.safetensors is not a valid safetensors file")
case("resume-state-not-json", "train resume", "state.json that is not JSON",
     resume(lambda run_dir, last: (last / ckpt.STATE_FILE).write_text("[")), CheckpointError,
     r"state\.json is not valid JSON")
case("resume-optimizer-mismatch", "train resume", "optimizer state with no parameter groups",
     resume(edit_state(lambda s: s["optimizer"].update(param_groups=[]))), CheckpointError,
     r"its training state does not fit this model and config \(ValueError")
case("resume-train-state-missing", "train resume", "state.json without train_state",
     resume(edit_state(lambda s: s.pop("train_state"))), CheckpointError, r"training state lacks \['train_state'\]")
case("train-run-exists", "train", "a second run into a finished run directory without resume",
     lambda ctx: train(ctx.config(), ctx.dataset(), ctx.copy_run(), progress=False, log=None), ConfigError,
     r"already holds a run; pass resume=True \(--resume\) or choose another directory")
case("config-invalid", "train TrainConfig", "dim 30 with 4 heads", lambda ctx: TrainConfig(dim=30, heads=4).validate(),
     ConfigError, "dim = 30 must be divisible by heads = 4")


# ------------------------------------------------------------------------------------------ CLI

def cli_case(*argv):
    def run(ctx):
        args = [a(ctx) if callable(a) else a for a in argv]
        return run_cli(*args)
    return run


class Arg:
    """A command-line argument computed from the context, shown as `shown` in the table."""

    def __init__(self, shown: str, make: Callable[[Context], Any]):
        self.shown, self.make = shown, make

    def __call__(self, ctx):
        return self.make(ctx)


def _no_cuda(ctx):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    return "cuda"


data_of = Arg("<tiny.txt>", lambda ctx: ctx.data)
out_of = Arg("<new dir>", lambda ctx: ctx.tmp / "out")
run_of = Arg("<run dir>", lambda ctx: ctx.run)
no_cuda = Arg("cuda", _no_cuda)


TRAIN = ("train", "--data", data_of, "--out", out_of)


def _relabelled(ctx) -> Path:
    """tiny.txt with every item id + 1000: the same number of items, none with the same id."""
    lines = [line.split() for line in ctx.data.read_text().splitlines()]
    path = ctx.tmp / "relabelled.txt"
    path.write_text("".join(" ".join([user] + [str(int(i) + 1000) for i in items]) + "\n" for user, *items in lines))
    return path


relabelled_of = Arg("<tiny.txt with item ids + 1000>", _relabelled)


def broken_checkpoint_of(shown: str, change: Callable[[Path], None]) -> Arg:
    def make(ctx):
        directory = ctx.copy_checkpoint()
        change(directory)
        return directory
    return Arg(shown, make)


def parquet_of(shown: str, **columns) -> Arg:
    """A Parquet file of three interactions with the given columns replaced."""
    def make(ctx):
        import pandas as pd

        pytest.importorskip("pyarrow", reason="writing the Parquet file needs pyarrow (pip install '.[test]')")
        path = ctx.tmp / "log.parquet"
        pd.DataFrame({"user": [1, 1, 2], "item": [1, 2, 3], "timestamp": [1, 2, 3], **columns}).to_parquet(path)
        return path
    return Arg(shown, make)


def _unreadable_parquet(ctx) -> Path:
    path = ctx.tmp / "log.parquet"
    path.write_bytes(b"PAR1 not really parquet")
    return path
for id_, argv, match in [
    ("train-dim-text", (*TRAIN, "--dim", "abc"), r"exit 2; stderr: diffrec train: error: argument --dim: invalid int value: 'abc'"),
    ("train-kind", (*TRAIN, "--kind", "bert4rec"), r"exit 2; stderr: .*argument --kind: invalid choice: 'bert4rec'"),
    ("train-lr-text", (*TRAIN, "--lr", "fast"), r"exit 2; stderr: .*argument --lr: invalid float value: 'fast'"),
    ("train-dropout", (*TRAIN, "--dropout", "2"), r"exit 2; stderr: diffrec train: error: invalid config: dropout must be in \[0, 1\), got 2\.0"),
    ("train-heads", (*TRAIN, "--dim", "30", "--heads", "4"), "exit 2; stderr: .*invalid config: dim = 30 must be divisible by heads = 4"),
    ("train-num-steps", (*TRAIN, "--num-steps", "0"), "exit 2; stderr: .*invalid config: num_steps must be >= 1, got 0"),
    ("train-device", (*TRAIN, "--device", "tpu"), "exit 2; stderr: .*invalid config: device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'tpu'"),
    ("train-k-core", (*TRAIN, "--k-core", "0"), "exit 2; stderr: .*--k-core must be a positive integer, got 0"),
    ("train-item-k-core", (*TRAIN, "--item-k-core", "-1"), "exit 2; stderr: .*--item-k-core must be a non-negative integer, got -1"),
    ("train-min-rating-nan", (*TRAIN, "--min-rating", "nan"), "exit 2; stderr: .*--min-rating must be a finite number, got nan"),
    ("train-threads", (*TRAIN, "--threads", "-3"), "exit 2; stderr: .*argument --threads: must be a non-negative integer, got -3"),
    ("train-config-missing", (*TRAIN, "--config", Arg("<missing.json>", lambda ctx: ctx.tmp / "none.json")),
     r"exit 2; stderr: .*cannot read --config \S+none\.json: \[Errno 2\] No such file or directory"),
    ("train-data-missing", ("train", "--data", Arg("<missing.txt>", lambda ctx: ctx.tmp / "none.txt"), "--out", out_of),
     r"exit 2; stderr: .*data file \S+none\.txt does not exist"),
    ("train-data-directory", ("train", "--data", Arg("<a directory>", lambda ctx: ctx.tmp), "--out", out_of),
     r"exit 2; stderr: .*data file \S+ is a directory, not a file"),
    ("train-columns-on-sequences", (*TRAIN, "--user-col", "who"),
     "exit 2; stderr: .*--user-col/--item-col/--time-col apply to CSV and Parquet files only"),
    ("train-wrong-format", (*TRAIN, "--format", "movielens"), r"exit 2; stderr: .*tiny\.txt, line 1: not a MovieLens ratings line"),
    ("train-run-exists", ("train", "--data", data_of, "--out", run_of, *TINY_FLAGS),
     r"exit 2; stderr: .*already holds a run; pass resume=True \(--resume\)"),
    ("train-resume-changed", ("train", "--data", data_of, "--out", run_of, "--resume", *TINY_FLAGS, "--dim", "32"),
     r"exit 2; stderr: .*cannot resume \S+: config differs in \['dim'\]"),
    ("train-out-under-file", ("train", "--data", data_of, "--out", Arg("<tiny.txt>/run", lambda ctx: ctx.data / "run"),
                              *TINY_FLAGS),
     r"exit 1; stderr: diffrec train: error: \[Errno 20\] Not a directory"),
    ("train-cuda-missing", (*TRAIN, "--device", no_cuda, "--k-core", "2"),
     "exit 2; stderr: .*device 'cuda' requested but CUDA is not available"),
    ("evaluate-seeds-zero", ("evaluate", "--checkpoint", run_of, "--seeds", "0"),
     "exit 2; stderr: .*argument --num-samples/--seeds: must be a positive integer, got 0"),
    ("evaluate-batch-size-zero", ("evaluate", "--checkpoint", run_of, "--batch-size", "0"),
     "exit 2; stderr: .*argument --batch-size: must be a positive integer, got 0"),
    ("evaluate-no-checkpoint", ("evaluate", "--checkpoint", Arg("<missing dir>", lambda ctx: ctx.tmp / "none")),
     r"exit 2; stderr: .*checkpoint path \S+none does not exist"),
    ("evaluate-other-catalog", ("evaluate", "--checkpoint", run_of, "--data", data_of, "--k-core", "4", "--quiet",
                                "--device", "cpu"),
     r"exit 2; stderr: .*the dataset's catalog differs from the checkpoint's \(the dataset has \d+ items, the "
     r"checkpoint \d+\)"),
    ("evaluate-relabelled-catalog", ("evaluate", "--checkpoint", run_of, "--data", relabelled_of, "--k-core", "2",
                                     "--quiet", "--device", "cpu"),
     r"exit 2; stderr: .*the dataset's catalog differs from the checkpoint's \(both have (\d+) items, but \1 ids "
     r"differ; the first, dense id 1, is '10\d\d' in the dataset and '\d+' in the checkpoint\)"),
    ("recommend-config-list", ("recommend", "--checkpoint", broken_checkpoint_of(
        "<checkpoint whose config.json is [1, 2]>", lambda d: (d / ckpt.CONFIG_FILE).write_text("[1, 2]")),
        "--history", "1", "--device", "cpu"),
     r"exit 2; stderr: .*config\.json must hold a JSON object, got a list"),
    ("evaluate-config-list", ("evaluate", "--checkpoint", broken_checkpoint_of(
        "<checkpoint whose config.json is [1, 2]>", lambda d: (d / ckpt.CONFIG_FILE).write_text("[1, 2]")),
        "--device", "cpu"), r"exit 2; stderr: .*config\.json must hold a JSON object, got a list"),
    ("evaluate-items-list-entry", ("evaluate", "--checkpoint", broken_checkpoint_of(
        "<checkpoint with [1, 2] in items.json>", edit_json(ckpt.ITEMS_FILE, lambda items: items[:2] + [[1, 2]] + items[3:])),
        "--device", "cpu"), r"exit 2; stderr: .*items\.json: entry 2 = \[1, 2\] is not an item id"),
    ("recommend-items-duplicate", ("recommend", "--checkpoint", broken_checkpoint_of(
        "<checkpoint with an id twice in items.json>", edit_json(ckpt.ITEMS_FILE, lambda items: [items[1]] + items[1:])),
        "--history", "1", "--device", "cpu"), r"exit 2; stderr: .*items\.json: entry 1 = \S+ repeats entry 0"),
    ("train-lr-nan", (*TRAIN, "--lr", "nan"), r"exit 2; stderr: .*invalid config: lr must be a finite float, got nan"),
    ("train-parquet-bool-user", ("train", "--data", parquet_of("<log.parquet with a boolean user column>",
                                                               user=[True, False, True]), "--out", out_of, *TINY_FLAGS),
     r"exit 2; stderr: diffrec train: error: \S+log\.parquet: column 'user' is boolean \(dtype bool\); expected ids$"),
    ("train-parquet-list-item", ("train", "--data", parquet_of("<log.parquet with a list-typed item column>",
                                                               item=[[1], [2, 3], [4]]), "--out", out_of, *TINY_FLAGS),
     r"exit 2; stderr: diffrec train: error: \S+log\.parquet: row 1: column 'item' holds ndarray '\[1\]'"),
    ("evaluate-split", ("evaluate", "--checkpoint", run_of, "--split", "train"),
     "exit 2; stderr: .*argument --split: invalid choice: 'train'"),
    ("recommend-unknown-user", ("recommend", "--checkpoint", run_of, "--user", "999999", "--device", "cpu"),
     "exit 2; stderr: .*user 999999 is not in the dataset"),
    ("recommend-no-subject", ("recommend", "--checkpoint", run_of), "exit 2; stderr: .*give exactly one of --user"),
    ("recommend-k-zero", ("recommend", "--checkpoint", run_of, "--history", "1", "-k", "0", "--device", "cpu"),
     r"exit 2; stderr: .*k must be an int in \[1, num_items = \d+\], got 0"),
    ("recommend-stride-zero", ("recommend", "--checkpoint", run_of, "--history", "1", "--method", "alg2",
                               "--stride", "0"), "exit 2; stderr: .*argument --stride: must be a positive integer, got 0"),
    ("recommend-items-missing", ("recommend", "--checkpoint", run_of, "--history", "1", "--items",
                                 Arg("<missing movies.dat>", lambda ctx: ctx.tmp / "movies.dat"), "--device", "cpu"),
     r"exit 2; stderr: .*cannot read --items \S+movies\.dat: No such file or directory"),
    ("recommend-device", ("recommend", "--checkpoint", run_of, "--history", "1", "--device", "tpu"),
     "exit 2; stderr: .*--device 'tpu': Expected one of cpu, cuda"),
    ("prepare-two-inputs", ("prepare", data_of, "--data", Arg("<other.txt>", lambda ctx: ctx.tmp / "other.txt")),
     "exit 2; stderr: .*give the input file once"),
    ("prepare-k-core-empties", ("prepare", data_of, "--k-core", "50"), "exit 2; stderr: .*removed everything"),
    ("download-unknown", ("download", "ml-9m", "--dest", Arg("<dir>", lambda ctx: ctx.tmp)), "exit 2; stderr: .*unknown MovieLens dataset 'ml-9m'"),
    ("unknown-command", ("fit",), "exit 2; stderr: .*argument command: invalid choice: 'fit'"),
]:
    shown = " ".join(a if isinstance(a, str) else a.shown for a in argv).replace(" ".join(TINY_FLAGS), "<tiny flags>")
    case(f"cli-{id_}", "CLI " + argv[0], shown, cli_case(*argv), CLIExit, match)


case("cli-train-parquet-no-engine", "CLI train", "train --data <log.parquet> without pyarrow installed",
     without_parquet_engine(cli_case("train", "--data", Arg("<log.parquet>", _unreadable_parquet), "--out", out_of)),
     CLIExit, r"exit 2; stderr: diffrec train: error: reading \S+log\.parquet needs a Parquet engine: pip install "
              r"pyarrow \(or pip install 'diffrec-ext\[parquet\]'\)$")


def evaluate_reproduces_the_run_result(ctx):
    report = ctx.tmp / "evaluate.json"
    run_cli("evaluate", "--checkpoint", ctx.run, "--device", "cpu", "--quiet", "--json", report)
    result = json.loads((ctx.run / "result.json").read_text())
    assert json.loads(report.read_text())["test"][result["kind"]] == result["test"]


case("cli-evaluate-default-seed", "CLI evaluate", "evaluate --checkpoint <run dir> (no --seed, no --batch-size)",
     evaluate_reproduces_the_run_result, None,
     sees="accepted: the checkpoint's training seed and eval_batch_size are the defaults, so the test metrics equal "
          "the run's result.json")


def cli_unknown_history_skipped(ctx):
    out, err = run_cli("recommend", "--checkpoint", ctx.run, "--history", "1", "nope", "--device", "cpu", "-k", "3",
                       "--skip-unknown")
    assert "skipping 1 item ids unknown to the model: ['nope']" in err and "top-3" in out


case("cli-recommend-unknown-history", "CLI recommend", "recommend --history 1 nope",
     cli_case("recommend", "--checkpoint", run_of, "--history", "1", "nope", "--device", "cpu", "-k", "3"), CLIExit,
     r"exit 2; stderr: .*--history has 1 item id\(s\) the model does not know: \['nope'\] \(--skip-unknown")
case("cli-recommend-unknown-history-skipped", "CLI recommend", "recommend --history 1 nope --skip-unknown",
     cli_unknown_history_skipped, None,
     sees="accepted: stderr \"skipping 1 item ids unknown to the model: ['nope']\", then the top-k of the rest")


# ================================================================================================
# The table test


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, context):
    if case.needs_extension and not ops.HAVE_EXTENSION:
        pytest.skip("compiled extension not built")
    if case.error is None:
        case.run(context)  # asserts the documented behaviour itself
        return
    with pytest.raises(case.error) as raised:
        case.run(context)
    message = str(raised.value)
    assert re.search(case.match, message), f"message {message!r} does not match {case.match!r}"


def test_case_ids_are_unique_and_documented():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))
    text = DOCS.read_text()
    documented = set(re.findall(r"^\| `([a-zA-Z0-9-]+)` \|", text, flags=re.M))
    assert documented == set(ids), (
        f"docs/reliability.md is out of date: missing {sorted(set(ids) - documented)}, stale "
        f"{sorted(documented - set(ids))}; regenerate with PYTHONPATH=. python tests/test_reliability.py")
    rejected = sum(c.error is not None for c in CASES)
    assert f"**{len(CASES)} bad inputs** in the table ({rejected} rejected" in text
    if ops.HAVE_EXTENSION:
        assert f"**{len(LAYOUT_CASES)} argument layouts**" in text


# ================================================================================================
# Layouts: non-contiguous, strided, offset, expanded (stride 0), overlapping, aliased arguments


def transposed(t):
    return t.transpose(-1, -2).contiguous().transpose(-1, -2) if t.dim() >= 2 else None


def strided(t):
    return torch.stack([t, torch.zeros_like(t)], dim=-1)[..., 0]


def offset(t):
    flat = t.reshape(-1)
    return torch.cat([flat.new_zeros(3), flat])[3:].view(t.shape)


def expanded(t):
    return t[:1].expand_as(t) if t.dim() >= 1 and t.shape[0] > 1 else None


def overlapping(t):
    """Rows that share memory: as_strided with every stride but the last halved."""
    if t.dim() < 2:
        return None
    strides = [max(1, s // 2) for s in t.contiguous().stride()[:-1]] + [1]
    size = sum((n - 1) * s for n, s in zip(t.shape, strides)) + 1
    base = t.reshape(-1)[:size].clone() if t.numel() >= size else t.reshape(-1).repeat(2)[:size].clone()
    return base.as_strided(t.shape, strides)


LAYOUTS = {"transposed": transposed, "strided": strided, "offset": offset, "expanded": expanded,
           "overlapping": overlapping}


def layout_ops():
    """(op name, argument dict with the positional order of the op, call, CSR-like args that must keep
    their values)."""
    gen = torch.Generator().manual_seed(5)
    den = denoiser_args(padding_mask=torch.tensor([[True, False, False, False], [False] * 4]))
    hidden, weight, bias = catalog(batch=3, seeds=2, dim=8, items=300)
    offsets, ids = ops.exclusion_csr([[1, 5, 7], [], [2]])
    lse = torch.logsumexp(torch.einsum("bsd,vd->bsv", hidden, weight) + bias, -1) + 0.1
    hidden2 = torch.randn(3, 8, generator=gen)
    targets = torch.tensor([0, 299, 17])
    _, xent_lse = C.catalog_xent(hidden2, weight, bias, targets)
    return [
        ("denoiser_input", den, lambda a: C.denoiser_input(*a.values()), ()),
        ("denoiser_input_backward", dict(grad_out=torch.randn(2, 4, 8, generator=gen), steps=den["steps"],
                                         sqrt_abar=den["sqrt_abar"], padding_mask=den["padding_mask"],
                                         noised_positions=2, add_position=True),
         lambda a: C.denoiser_input_backward(*a.values()), ()),
        ("seed_avg_probs", dict(hidden=hidden, weight=weight, bias=bias, lse=lse),
         lambda a: C.seed_avg_probs(*a.values()), ()),
        ("seed_topk", dict(hidden=hidden, weight=weight, bias=bias, k=7, exclude_offsets=offsets, exclude_ids=ids,
                           lse=lse), lambda a: C.seed_topk(*a.values()), ("exclude_offsets", "exclude_ids")),
        ("seed_target_rank", dict(hidden=hidden, weight=weight, bias=bias, targets=targets, exclude_offsets=offsets,
                                  exclude_ids=ids, lse=None), lambda a: C.seed_target_rank(*a.values()),
         ("exclude_offsets", "exclude_ids")),
        ("catalog_xent", dict(hidden=hidden2, weight=weight, bias=bias, targets=targets),
         lambda a: C.catalog_xent(*a.values()), ()),
        ("catalog_xent_backward", dict(grad_loss=torch.rand(3, generator=gen), hidden=hidden2, weight=weight, bias=bias,
                                       targets=targets, lse=xent_lse),
         lambda a: C.catalog_xent_backward(*a.values()), ()),
    ]


def layout_cases():
    if not ops.HAVE_EXTENSION:
        return []
    cases = []
    for name, args, _, keep in layout_ops():
        for arg, value in args.items():
            if not isinstance(value, torch.Tensor):
                continue
            for layout, make in LAYOUTS.items():
                if arg in keep and layout in ("expanded", "overlapping"):
                    continue  # a CSR list must keep its values to stay valid
                odd = make(value)
                if odd is not None and not (odd.is_contiguous() and odd.storage_offset() == 0):
                    cases.append((name, arg, layout))
    return cases


LAYOUT_CASES = layout_cases()


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and ops.BUILD_INFO.get("with_cuda") else [])


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op_name, arg, layout", LAYOUT_CASES, ids=["-".join(c) for c in LAYOUT_CASES])
def test_op_layouts_give_the_contiguous_result(op_name, arg, layout, device):
    """Each tensor argument in each odd layout gives, bit for bit, the result of its contiguous copy
    (on the GPU too where there is one)."""
    _, args, call, _ = next(op for op in layout_ops() if op[0] == op_name)
    args = {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in args.items()}
    odd = LAYOUTS[layout](args[arg])
    got = call({**args, arg: odd})
    want = call({**args, arg: odd.contiguous()})
    for g, w in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
        assert torch.equal(g, w), f"{op_name}({arg} {layout}) differs from the contiguous call"


@needs_ext
def test_aliased_arguments():
    """Arguments that share memory with each other (bias a column of weight, noise a slice of
    item_emb, lse computed into a view): the ops never write their inputs, so results are exact."""
    hidden, weight, _ = catalog(batch=2, seeds=2, dim=8, items=50)
    bias = weight[:, 3]  # aliases weight, strided
    torch.testing.assert_close(C.seed_avg_probs(hidden, weight, bias),
                               ref.seed_avg_probs(hidden.double(), weight.double(), bias.double()).float(),
                               rtol=1e-5, atol=1e-7)
    args = denoiser_args()
    item = args["item_emb"]
    args["noise"] = item[:, -1:]  # the noise is the clean target itself
    out = C.denoiser_input(*args.values())
    want = ref.denoiser_input(*[a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                                for a in args.values()])
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-6)
    assert torch.equal(item, args["item_emb"])  # input untouched


@needs_ext
def test_gradients_through_expanded_and_strided_parameters():
    """Autograd through the wrappers with a stride-0 catalog and a transposed, offset hidden."""
    base = torch.randn(1, 6, dtype=torch.float64, requires_grad=True)
    hidden = torch.randn(6, 4, dtype=torch.float64).t().requires_grad_(True)  # [4, 6], transposed
    targets = torch.tensor([0, 3, 9, 9])
    assert torch.autograd.gradcheck(lambda h, b: ops.catalog_xent(h, b.expand(10, 6), None, targets)[0], (hidden, base))
    pos_base = torch.randn(1, 8, dtype=torch.float64, requires_grad=True)
    args = denoiser_args()
    item = transposed(args["item_emb"].double()).requires_grad_(True)
    sa, so = args["sqrt_abar"].double(), args["sqrt_one_minus_abar"].double()
    fn = lambda i, p: ops.denoiser_input(i, p.expand(4, 8), args["steps"], sa, so, args["noise"].double(),  # noqa: E731
                                         args["padding_mask"], 1, True, True)
    assert torch.autograd.gradcheck(fn, (item, pos_base))


# ================================================================================================
# NaN and Inf: the seed ops refuse them by name (tests/test_seed_topk_certificate.py covers every op,
# argument and value); catalog_xent propagates them. The inference layer names the histories first.


NON_FINITE = [("hidden", float("nan")), ("hidden", float("inf")), ("hidden", float("-inf")), ("weight", float("nan")),
              ("bias", float("nan")), ("bias", float("inf"))]


@needs_ext
@pytest.mark.parametrize("where, value", NON_FINITE, ids=[f"{w}-{v}" for w, v in NON_FINITE])
def test_non_finite_inputs_are_refused_by_seed_ops_and_propagate_in_catalog_xent(where, value):
    """A NaN/Inf seed vector of user 0 (hidden), catalog row (weight) or bias entry: the seed ops
    raise naming the argument; catalog_xent gives user 0 a NaN/Inf loss, never finite garbage."""
    hidden, weight, bias = catalog(batch=2, seeds=2, dim=8, items=30)
    {"hidden": hidden[0, 0], "weight": weight[0], "bias": bias[:1]}[where].fill_(value)
    message = rf"{where} contains a non-finite value \(nan or inf\)"
    with pytest.raises(RuntimeError, match="seed_avg_probs: " + message):
        C.seed_avg_probs(hidden, weight, bias)
    with pytest.raises(RuntimeError, match="seed_topk: " + message):
        C.seed_topk(hidden, weight, bias, 5, None, None)
    loss, _ = C.catalog_xent(hidden[:, 0].contiguous(), weight, bias, torch.tensor([1, 2]))
    assert not torch.isfinite(loss[0])


@needs_ext
def test_minus_infinity_bias_is_refused_and_a_very_negative_one_masks():
    """-inf in the bias is refused like any non-finite value; a large negative finite bias still
    removes an item from the softmax (probability exactly 0)."""
    hidden, weight, bias = catalog(batch=2, seeds=2, dim=8, items=30)
    bias[3] = float("-inf")
    with pytest.raises(RuntimeError, match=r"seed_avg_probs: bias contains a non-finite value"):
        C.seed_avg_probs(hidden, weight, bias)
    bias[3] = -1e30
    probs = C.seed_avg_probs(hidden, weight, bias)
    assert bool(torch.isfinite(probs).all()) and (probs[:, 3] == 0).all()
    assert 3 not in C.seed_topk(hidden, weight, bias, 5, None, None)[1].flatten().tolist()


# ================================================================================================
# The documentation table


def _normalize(message: str, context: Context) -> str:
    message = message.strip().splitlines()[0] if message.strip() else ""
    for path, name in ((context.tmp, "<tmp>"), (context.base, "<tmp>"), (REPO_ROOT, "<repo>")):
        message = message.replace(str(path), name)
    if len(message) > 260:
        message = message[:260] + " …"
    return message.replace("|", "\\|")


def markdown_table(context: Context, tmp_root: Path) -> str:
    rows = ["| case | where | bad input | what the user sees |", "|---|---|---|---|"]
    for number, c in enumerate(CASES):
        context = Context(context.base, context.data, context.run, tmp_root / f"case{number}")
        context.tmp.mkdir(parents=True)
        if c.error is None:
            seen = c.sees
        else:
            try:
                c.run(context)
                seen = "(no error: this case fails its test)"
            except CLIExit as error:
                seen = _normalize(str(error), context)
            except c.error as error:
                seen = f"{c.error.__name__}: {_normalize(str(error), context)}"
            except BaseException as error:  # noqa: BLE001 - shows up in the table for a human to see
                seen = f"unexpected {type(error).__name__}: {_normalize(str(error), context)}"
        seen = seen.replace("\n", " ")
        bad = c.bad.replace("|", "\\|")
        rows.append(f"| `{c.id}` | {c.where} | {bad} | {seen} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":  # PYTHONPATH=. python tests/test_reliability.py > /tmp/table.md
    import tempfile

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as root:
        context = build_context(Path(root) / "shared")
        sys.stdout.write(markdown_table(context, Path(root) / "cases"))
        layouts = len(LAYOUT_CASES)
        sys.stderr.write(f"{len(CASES)} table cases ({sum(c.error is not None for c in CASES)} errors, "
                         f"{sum(c.error is None for c in CASES)} accepted), {layouts} layout cases\n")
