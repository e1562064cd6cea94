"""Checkpoints of an editor training run (orbax), safe to kill at any moment.

A checkpoint `<dir>/<step>/` holds three items:
  editor  {"params", "norm"}            what `apply.load_editor` needs to edit
  train   {"opt_state", "step", "rng"}  what a resumed run needs besides
  meta    JSON: format, model name, the editor spec (weight paths, layouts, kernel shapes,
          editor config), the training config, the data position (seed, step) and the
          run's early-stopping record (best val loss and step, last validation).

Orbax writes each step into a temporary folder and renames it when complete, so a step folder
is never half-written; leftover temporary folders (from a kill) are ignored and cleaned up.
The last `keep` checkpoints are kept, plus the best one by validation loss.

Errors are explicit: a checkpoint made for another model, other weights or an incompatible
training configuration raises `CheckpointMismatch`; one that cannot be read raises
`CheckpointError` naming the folder and the older steps still available. A resumed run
(`EditorCheckpointer.restore_newest`) falls back to the newest step that restores cleanly: each
damaged step is moved aside to `<dir>.damaged/` (never deleted) and named in one line, and
orbax's own error logs are kept quiet on that path.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocm

from salem_jax.errors import UserError
from salem_jax.mend.editor import EditorSpec, init_editor

FORMAT = "salem-jax-editor/1"

# Training-config fields that change the trajectory: a resumed run must agree on them. Others
# (max_steps, val_every, patience, checkpoint_every, log_every, keep_checkpoints) may change.
_TRAJECTORY_FIELDS = (
    "edits_per_group",
    "adapt_per_edit",
    "pass_per_group",
    "extra_pass_per_group",
    "own_pass_per_group",
    "batch_size",
    "accum_steps",
    "c_fail",
    "c_loc",
    "lr",
    "lr_lr",
    "grad_clip",
    "seed",
    "null_energy",
    "null_tokens",
    "null_facts",
    "null_facts_weight",
)
# Trajectory fields added after checkpoints were first written: a checkpoint without one was
# written with this value (so older checkpoints still resume).
_ADDED_FIELDS = {"extra_pass_per_group": 0, "own_pass_per_group": 0, "null_energy": 0.0, "null_tokens": 100_000,
                 "null_facts": "", "null_facts_weight": 1.0}


class CheckpointError(UserError, RuntimeError):
    """A checkpoint cannot be used (unreadable, missing, or of another format). A `UserError`
    (the `salem` commands print it in one line), and a RuntimeError as it always was."""


class CheckpointMismatch(CheckpointError):
    """A checkpoint belongs to another model, other edited weights or another configuration."""


@contextlib.contextmanager
def quiet_orbax():
    """Silence orbax's (absl) error and warning logs while a damaged checkpoint is probed: the
    error that matters is raised (or reported) by us, in one line."""
    loggers = [logging.getLogger(n) for n in ("absl", "orbax", "orbax.checkpoint")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def _abstract(tree: Any) -> Any:
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def _finite_or_none(x):
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else x


def _manager(directory: Path, keep: int | None, read_only: bool) -> ocp.CheckpointManager:
    policy = None
    if keep is not None:
        policy = ocm.AnyPreservationPolicy(
            [
                ocm.LatestN(n=keep),
                ocm.BestN(get_metric_fn=lambda m: m["val_loss"], reverse=True, n=1, keep_checkpoints_without_metrics=False),
            ]
        )
    # Readers open the manager without `read_only` (orbax logs a warning for each such manager)
    # and never save through it; only the training writer creates folders and cleans up the
    # temporary folders of interrupted saves.
    options = ocp.CheckpointManagerOptions(
        create=not read_only,
        cleanup_tmp_directories=not read_only,
        preservation_policy=policy,
    )
    return ocp.CheckpointManager(directory, item_names=("editor", "train", "meta"), options=options)


class EditorCheckpointer:
    """Save and restore the state of `mend.train.train_editor` in `directory`."""

    def __init__(self, directory: str | Path, *, model_name: str, spec: EditorSpec, config, keep: int = 3):
        self.directory = Path(directory).absolute()
        self.model_name = model_name
        self.spec = spec
        self.config = config
        self.mngr = _manager(self.directory, keep, read_only=False)

    # -- saving
    def save(self, step: int, state: dict, run: dict, val_loss: float | None = None) -> None:
        """Save `state` (the train state dict) at `step`; `val_loss` ranks the best checkpoint."""
        meta = {
            "format": FORMAT,
            "model": self.model_name,
            "spec": self.spec.to_dict(),
            "config": self.config.to_dict(),
            "step": int(step),
            "data": {"seed": int(self.config.seed), "position": int(step)},
            "run": {k: _finite_or_none(v) for k, v in run.items()},
        }
        args = ocp.args.Composite(
            editor=ocp.args.StandardSave({"params": state["params"], "norm": state["norm"]}),
            train=ocp.args.StandardSave({"opt_state": state["opt_state"], "step": state["step"], "rng": state["rng"]}),
            meta=ocp.args.JsonSave(meta),
        )
        metrics = None if val_loss is None else {"val_loss": float(val_loss)}
        self.mngr.save(step, args=args, metrics=metrics, force=True)

    def wait(self) -> None:
        self.mngr.wait_until_finished()

    def latest_step(self) -> int | None:
        return self.mngr.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.mngr.all_steps())

    # -- restoring
    def restore(self, step: int, like_state: dict) -> tuple[dict, dict]:
        """The train state saved at `step` (shaped and placed like `like_state`) and its meta.

        Raises CheckpointMismatch if it was made for another model / weights / configuration."""
        with quiet_orbax():
            meta = read_meta(self.directory, step, self.mngr)
        check_compatible(meta, self.model_name, self.spec, self.config, where=f"{self.directory}/{step}")
        try:
            out = self.mngr.restore(
                step,
                args=ocp.args.Composite(
                    editor=ocp.args.StandardRestore(_abstract({"params": like_state["params"], "norm": like_state["norm"]})),
                    train=ocp.args.StandardRestore(
                        _abstract({"opt_state": like_state["opt_state"], "step": like_state["step"], "rng": like_state["rng"]})
                    ),
                ),
            )
        except Exception as e:  # orbax raises many types for damaged files
            raise _unreadable(self.directory, step, self.all_steps(), e) from e
        state = {**out["editor"], **out["train"]}
        return state, meta

    def move_aside(self, step: int) -> Path:
        """Move the folder of `step` to `<directory>.damaged/<step>-<time>` (never deleted) and
        make the manager forget it. Returns the new path."""
        aside = self.directory.parent / f"{self.directory.name}.damaged"
        aside.mkdir(parents=True, exist_ok=True)
        dest = aside / f"{step}-{time.strftime('%Y%m%dT%H%M%S')}"
        n = 0
        while dest.exists():
            n += 1
            dest = aside / f"{step}-{time.strftime('%Y%m%dT%H%M%S')}-{n}"
        os.rename(self.directory / str(step), dest)
        self.mngr.reload()
        return dest

    def restore_newest(self, like_state: dict, *, log=None) -> tuple[dict, dict] | None:
        """The train state and meta of the newest checkpoint that restores cleanly, or None if
        there is none. Each newer step that cannot be read is moved aside (`move_aside`) and
        reported in one line through `log` (default: stderr). A checkpoint of another model,
        weights or configuration still raises `CheckpointMismatch`: that is not damage."""
        log = log or (lambda msg: print(msg, file=sys.stderr))
        for step in sorted(self.all_steps(), reverse=True):
            try:
                with quiet_orbax():
                    return self.restore(step, like_state)
            except CheckpointMismatch:
                raise
            except CheckpointError as e:
                cause = e.__cause__ or e
                dest = self.move_aside(step)
                log(f"checkpoint step {step} cannot be read ({type(cause).__name__}: {' '.join(str(cause).split())[:120]}); "
                    f"moved it to {dest} and trying the one before")
        return None


def _unreadable(directory: Path, step: int, steps: list[int], err: Exception) -> CheckpointError:
    older = [s for s in steps if s < step]
    return CheckpointError(
        f"checkpoint {directory}/{step} cannot be read ({type(err).__name__}: {str(err)[:300]}). It may be "
        f"corrupted or incomplete. Older checkpoints kept in {directory}: {older or 'none'}. Move the damaged "
        f"folder aside to resume from an older one."
    )


def read_meta(directory: str | Path, step: int, mngr: ocp.CheckpointManager | None = None) -> dict:
    """The JSON metadata of checkpoint `step` (a CheckpointError if unreadable or foreign)."""
    directory = Path(directory).absolute()
    own = mngr is None
    mngr = mngr or _manager(directory, None, read_only=True)
    try:
        meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:
        raise _unreadable(directory, step, list(mngr.all_steps()), e) from e
    finally:
        if own:
            mngr.close()
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{directory}/{step} is not a salem-jax editor checkpoint (format {FORMAT!r} expected)")
    return meta


def check_compatible(meta: dict, model_name: str, spec: EditorSpec, config, where: str) -> None:
    """Raise CheckpointMismatch when `meta` was written for another model, weights or config."""
    if meta["model"] != model_name:
        raise CheckpointMismatch(f"{where} was trained for model {meta['model']!r}, not {model_name!r}")
    saved = EditorSpec.from_dict(meta["spec"])
    if saved.weights != spec.weights:
        raise CheckpointMismatch(
            f"{where} edits weights {[w.path for w in saved.weights]}, but this run edits {[w.path for w in spec.weights]}"
        )
    if saved.shapes != spec.shapes:
        raise CheckpointMismatch(f"{where} has kernel shapes {saved.shapes}, but the model has {spec.shapes}")
    if saved.config != spec.config:
        raise CheckpointMismatch(f"{where} has editor config {saved.config}, but this run uses {spec.config}")
    if config is not None:
        have = config.to_dict()
        saved_cfg = {k: meta["config"].get(k, _ADDED_FIELDS.get(k)) for k in _TRAJECTORY_FIELDS}
        # the token count only decides the null-space projector when there is one
        skip = {"null_tokens"} if saved_cfg["null_energy"] == 0 and have.get("null_energy", 0.0) == 0 else set()
        # and the facts' weight only when there are facts
        if not saved_cfg["null_facts"] and not have.get("null_facts", ""):
            skip.add("null_facts_weight")
        diffs = [f"{k}: saved {saved_cfg[k]!r}, now {have.get(k)!r}" for k in _TRAJECTORY_FIELDS
                 if k not in skip and saved_cfg[k] != have.get(k)]
        if diffs:
            hint = (" - an editor trained through one null-space projection (TrainConfig.null_energy) cannot resume "
                    "with another" if any(d.startswith("null_") for d in diffs) else "")
            raise CheckpointMismatch(f"{where} was written with another training configuration ({'; '.join(diffs)}){hint}")


def steps_in(directory: str | Path) -> list[int]:
    """Finished checkpoint steps in `directory` (temporary folders of interrupted saves excluded)."""
    directory = Path(directory)
    if not directory.exists():
        return []
    mngr = _manager(directory.absolute(), None, read_only=True)
    try:
        return list(mngr.all_steps())
    finally:
        mngr.close()


def restore_editor(directory: str | Path, step: int | str = "best") -> tuple[EditorSpec, dict, dict, dict]:
    """(spec, editor params, editor state, meta) from a checkpoint folder, without optimizer state.

    step: an int, "latest", or "best" (the best validation checkpoint; the latest when the run
    never validated)."""
    directory = Path(directory).absolute()
    steps = steps_in(directory)
    if not steps:
        raise CheckpointError(f"no editor checkpoint in {directory}")
    latest = max(steps)
    if step == "latest":
        step = latest
    elif step == "best":
        best = read_meta(directory, latest)["run"].get("best_step")
        step = latest if best is None else int(best)
    step = int(step)
    if step not in steps:
        raise CheckpointError(f"checkpoint step {step} is not in {directory} (have {steps})")
    meta = read_meta(directory, step)
    spec = EditorSpec.from_dict(meta["spec"])
    params, norm = init_editor(spec, jax.random.PRNGKey(0))
    mngr = _manager(directory, None, read_only=True)
    try:
        out = mngr.restore(
            step,
            args=ocp.args.Composite(editor=ocp.args.StandardRestore(_abstract({"params": params, "norm": norm}))),
        )
    except Exception as e:
        raise _unreadable(directory, step, steps, e) from e
    finally:
        mngr.close()
    return spec, out["editor"]["params"], out["editor"]["norm"], meta


__all__ = [
    "CheckpointError",
    "CheckpointMismatch",
    "EditorCheckpointer",
    "check_compatible",
    "quiet_orbax",
    "read_meta",
    "restore_editor",
    "steps_in",
]
