"""Writing an output folder, the one way: atomically, under the overwrite rule, with the command
line that made it and its model card.

Every command that writes a folder (prune, shrink, heal, analyze, the embedded model's conversion)
goes through :func:`write_folder`; nothing half-written is ever left at the target.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import sys
import tempfile
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from layerfold.errors import LayerfoldError


def command_line() -> str:
    """The command as the user typed it, quoted so that it can be pasted again: the ``layerfold``
    command's, or the Python script's that called the API (none for an interactive session)."""
    program = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    if program.startswith("layerfold") or program == "__main__.py":
        return "layerfold " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    if program in ("", "-", "-c"):
        return "(from Python, through layerfold.api)"
    return "python " + shlex.join(sys.argv)


MARKER = ".layerfold"  # written into every output folder: the files layerfold wrote there


def check_out(out: str | Path | None, overwrite: bool, what: str = "output folder") -> None:
    """Refuse an existing output before any work is done (the out-exists rule); with
    ``overwrite``, refuse one that layerfold may not replace (:func:`check_replaceable`)."""
    if out is None:
        return
    path = Path(out).expanduser()
    if not (path.exists() or path.is_symlink()):
        return
    if not overwrite:
        raise LayerfoldError(f"{what} {out} exists: choose another --out or pass --overwrite")
    check_replaceable(path, what)


def check_replaceable(path: Path, what: str = "output folder") -> None:
    """``--overwrite`` replaces only a folder layerfold wrote, holding nothing else: never the
    filesystem root, the home folder, the current folder or a folder above it, a link or a file."""
    resolved = path.resolve()
    if resolved == Path(resolved.anchor):
        raise LayerfoldError(f"{what} {path} is the filesystem root: --overwrite will not replace it")
    home = Path.home().resolve()
    if resolved == home or resolved in home.parents:
        raise LayerfoldError(f"{what} {path} is your home folder or above it: --overwrite will not replace it")
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise LayerfoldError(f"{what} {path} is the current folder or above it: --overwrite will not replace it; "
                             "choose a new --out")
    if path.is_symlink() or not path.is_dir():
        kind = "a link" if path.is_symlink() else "a file"
        raise LayerfoldError(f"{what} {path} is not a folder layerfold wrote ({kind}): --overwrite replaces only "
                             "layerfold outputs; choose another --out")
    written = _written_files(path)
    if written is None:
        raise LayerfoldError(f"{what} {path} is not a folder layerfold wrote (no {MARKER} file in it): --overwrite "
                             "replaces only layerfold outputs; choose another --out or remove it yourself")
    foreign = sorted(str(f.relative_to(path)) for f in path.rglob("*")
                     if not f.is_dir() and str(f.relative_to(path)) not in written | {MARKER})
    if foreign:
        more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        raise LayerfoldError(f"{what} {path} holds files layerfold did not write ({', '.join(foreign[:3])}{more}): "
                             "--overwrite would delete them; move them out or choose another --out")


def _written_files(folder: Path) -> set[str] | None:
    """The files layerfold recorded in ``folder``'s marker, or None when it has no valid marker."""
    try:
        record = json.loads((folder / MARKER).read_text(encoding="utf-8"))
        return {str(f) for f in record["files"]}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_marker(folder: Path) -> None:
    from layerfold.version import __version__

    files = sorted(str(f.relative_to(folder)) for f in folder.rglob("*") if not f.is_dir())
    record = {"written_by": "layerfold", "version": __version__, "files": files}
    (folder / MARKER).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


SHARD_SIZE = "5GB"  # safetensors shard size: transformers 4's default (5's is 50GB, one file up to that)
DISK_MARGIN = 64 * 2**20  # bytes beyond the weights: tokenizer, config, card, plan, safetensors headers


def save_model(model, tokenizer, out: str | Path, overwrite: bool = False,
               extra_files: dict[str, str] | None = None, write_extra=None,
               max_shard_size: str | int = SHARD_SIZE, layers=None) -> Path:
    """Save with ``save_pretrained`` into a temporary folder beside ``out``, then rename.

    The weights are written as safetensors shards of at most ``max_shard_size`` (with an index
    when there are several), one shard at a time from wherever the weights are (the CPU for a
    streamed model).  Nothing half-written is ever left at ``out``: a failure removes the
    temporary folder.  Refused before anything is written: non-finite weights (named with their
    decoder layer when the model's decoder ``layers`` are given), too little free disk.
    """
    from layerfold.finite import check_finite_weights

    out = Path(os.path.abspath(Path(out).expanduser()))
    check_out(out, overwrite)
    check_finite_weights(model, f"refusing to write {out}", layers)
    check_free_disk(out, weight_bytes(model) + DISK_MARGIN)

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        if write_extra is not None:
            write_extra(tmp)  # more files, written inside the temporary folder so they land atomically
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)

    write_folder(out, overwrite, write)
    return out


def weight_bytes(model) -> int:
    """Bytes of the model's parameters and persistent buffers (tied weights once): what
    ``save_pretrained`` writes, give or take the headers."""
    seen: set[int] = set()
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return total


def check_free_disk(out: str | Path, needed: int) -> None:
    """Refuse to start writing ``needed`` bytes beside ``out`` when the disk holds less free space.
    (An existing ``out`` is kept until the new folder is complete, so it frees nothing.)"""
    where = Path(out).expanduser().resolve().parent
    while not where.exists() and where != where.parent:
        where = where.parent
    free = shutil.disk_usage(where).free
    if free < needed:
        raise LayerfoldError(f"not enough free disk for {out}: it needs about {_gb(needed)}, {where} has "
                             f"{_gb(free)} free; free some space or choose another --out")


def _gb(size: int) -> str:
    return f"{size / 1e9:.2f} GB" if size >= 1e8 else f"{size / 1e6:.1f} MB"


def write_folder(out: Path, overwrite: bool, write):
    """Run ``write(tmp)`` on a temporary folder beside ``out``, then rename it to ``out``
    (replacing an existing one only with ``overwrite``, and only one layerfold wrote); return
    what ``write`` returned.

    Nothing half-written is ever left at ``out``: a failure, Ctrl-C, SIGTERM or SIGHUP removes
    the temporary folder (the process then exits with 128 + the signal number).  The temporary
    folder's name carries this process's id, so that one left by a killed run (SIGKILL) is
    removed by the next run for the same target (:func:`clean_stale`).  The folder gets the
    permissions the umask allows, as a plain ``mkdir`` would."""
    out = Path(os.path.abspath(Path(out).expanduser()))  # absolute, links not followed: a link is refused
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(out)
    check_out(out, overwrite)
    with _SignalGuard() as guard:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=out.parent))
        try:
            os.chmod(tmp, 0o777 & ~_umask())
            result = write(tmp)
            _write_marker(tmp)
            guard.defer()  # the swap runs to its end; a signal meanwhile is delivered after it
            _move_into_place(tmp, out)
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(exc, Terminated):
                print(f"layerfold: {exc.signal_name} received: the partial output was removed, nothing was written",
                      file=sys.stderr)
            raise
    return result


class Terminated(SystemExit):
    """SIGTERM or SIGHUP arrived while an output folder was being written."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signal_name = signal.Signals(signum).name


class _SignalGuard:
    """Within ``with``: SIGTERM and SIGHUP raise :class:`Terminated` in the main thread (so the
    temporary folder is removed as on Ctrl-C), where they would otherwise kill the process at once.
    Handlers someone else installed (or an ignored SIGHUP, as under nohup) are left alone."""

    SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))

    def __init__(self) -> None:
        self.previous: dict[int, Any] = {}
        self.deferred = False
        self.pending: int | None = None

    def __enter__(self) -> _SignalGuard:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                if signal.getsignal(sig) is signal.SIG_DFL:
                    self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame) -> None:
        if self.deferred:
            self.pending = signum
            return
        raise Terminated(signum)

    def defer(self) -> None:
        self.deferred = True

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        if self.pending is not None:  # the folder is complete: now die of the signal as asked
            os.kill(os.getpid(), self.pending)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _leftover_pid(name: str, stem: str) -> int | None:
    """The process id in a leftover ``.NAME.partial-PID-xxxx`` or ``.NAME.old-PID`` name."""
    rest = name[len(stem):].split("-", 1)[0]
    return int(rest) if rest.isdigit() else None


def clean_stale(out: Path) -> None:
    """Deal with what a killed run (SIGKILL, power loss) left beside ``out``: a temporary
    ``.NAME.partial-PID-*`` folder is removed; ``.NAME.old-PID``, the previous output set aside
    during a swap, is put back if ``out`` is missing, else removed.  Leftovers of a process
    still running are left alone; those without a readable process id are named in a warning."""
    if not out.parent.is_dir():
        return
    partial, old = f".{out.name}.partial-", f".{out.name}.old-"
    for entry in sorted(out.parent.iterdir()):
        stem = partial if entry.name.startswith(partial) else old if entry.name.startswith(old) else None
        if stem is None:
            continue
        pid = _leftover_pid(entry.name, stem)
        if pid is None:
            warnings.warn(f"{entry} was left by an interrupted layerfold run; remove it to free its space",
                          stacklevel=2)
            continue
        if pid == os.getpid() or _pid_running(pid):
            continue
        if stem == old and not (out.exists() or out.is_symlink()):
            os.replace(entry, out)
            print(f"layerfold: put back {out}, set aside by an interrupted run", file=sys.stderr)
        elif entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``; an existing ``out`` is set aside first, put back if the
    rename fails, and removed once the new folder is in place."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)
        raise
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink(missing_ok=True)


@dataclass
class PruneReport:
    plan: Any | None  # the depth plan; None when width alone removed everything (--split picked 0)
    out: Path | None
    layers_before: int
    layers_after: int
    params_before: int
    params_after: int
    perplexity_before: dict[str, float] = field(default_factory=dict)
    perplexity_after: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    ppl_windows: int | None = None
    ppl_bos: bool = False  # the perplexity windows start with BOS (tokenizers that put it in front of every text)
    width: Any | None = None  # the WidthPlan, when width pruning took part
    depth_width: dict | None = None  # with --split: the split chosen and every candidate tried


def model_card(report: PruneReport, loaded, command: str) -> str:
    """The one model card (README.md) of a pruned folder: what was removed (depth, width or both),
    how to load it, the command that made it, the plans and how to apply them again, perplexity."""
    kinds = [k for k, given in (("depth-pruning", report.plan is not None), ("width-pruning", report.width))
             if given]
    lines = ["---", "library_name: transformers", f"tags: [layerfold, {', '.join(kinds)}]", "---",
             f"# {Path(str(loaded.source)).name} pruned by layerfold"
             + (f" ({report.plan.method})" if report.plan is not None else ""), "",
             f"Made with layerfold from `{loaded.source}`: {report.layers_before} -> {report.layers_after} decoder "
             f"layers, {report.params_before:,} -> {report.params_after:,} parameters "
             f"({1 - report.params_after / max(report.params_before, 1):.1%} removed). Load it with plain "
             "transformers:", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
             'model = AutoModelForCausalLM.from_pretrained("<this folder>")', "```", "", "## How it was made", "",
             f"    {command}", ""]
    lines += _depth_lines(report.plan) + _width_lines(report.width) + _split_lines(report.depth_width)
    lines += [f"The plans are data; in this folder, `{again_command(loaded, report)}` applies them again.", ""]
    lines += _perplexity_lines(report)
    return "\n".join(lines)


def _depth_lines(plan) -> list[str]:
    if plan is None:
        return []
    threshold = plan.threshold if plan.threshold is not None else "-"
    return [plan.summary(), "", f"Criterion: {plan.criterion or '-'}; threshold: {threshold}; merge: "
            f"{json.dumps(plan.merge) if plan.merge else '-'}; calibration: {json.dumps(plan.calibration)}. "
            "The full plan is in `plan.json`.", ""]


def _width_lines(width) -> list[str]:
    if width is None:
        return []
    text = width.summary()
    return [text[0].upper() + text[1:] + ". Every layer keeps the same number of MLP channels and heads (chosen "
            "per layer by importance), because a transformers config holds one `intermediate_size` and one head "
            "count; `head_dim` is written explicitly. The width plan is in `width_plan.json`.", ""]


def _split_lines(dw: dict | None) -> list[str]:
    """The depth/width split taken, and every candidate's held-out loss."""
    if not dw:
        return []
    lines = [f"Budget: --param-ratio {dw['param_ratio']}, split {dw['split']} (share of the removed "
             "parameters taken by depth).", ""]
    if dw["candidates"]:
        lines += ["| split | layers | parameters | held-out calibration NLL |", "|---|---|---|---|"]
        for c in dw["candidates"]:
            loss = c["error"] if c["error"] is not None else f"{c['heldout_nll']:.4f}"
            lines.append(f"| {c['split']} | {c['layers']} | {c['params']} | {loss} |")
        lines.append("")
    return lines


def _perplexity_lines(report: PruneReport) -> list[str]:
    if not report.perplexity_before:
        return []
    windows = "all" if report.ppl_windows is None else f"first {report.ppl_windows}"
    bos = "BOS first" if report.ppl_bos else "no BOS"
    lines = [f"## Perplexity (128-token windows, {windows}, {bos})", "", "| text | before | after |", "|---|---|---|"]
    lines += [f"| {s} | {before:.2f} | {report.perplexity_after.get(s, float('nan')):.2f} |"
              for s, before in report.perplexity_before.items()]
    return [*lines, ""]


def again_command(loaded, report: PruneReport | None = None) -> str:
    """The command that applies this folder's plans (``plan.json``, ``width_plan.json``) to the same
    source model, as it works when pasted in the output folder: no model argument for the embedded
    default (its name is not a hub id), an absolute path for a local folder, the hub id otherwise."""
    from layerfold.assets import DEFAULT_MODEL_NAME

    if loaded.source == DEFAULT_MODEL_NAME:
        model = ""
    elif Path(str(loaded.path)).is_dir():
        model = shlex.quote(os.path.abspath(str(loaded.path))) + " "
    else:
        model = shlex.quote(str(loaded.source)) + " "
    if report is not None and report.width is not None:
        if report.plan is None:
            return f"layerfold shrink {model}--plan width_plan.json --out pruned"
        return f"layerfold prune {model}--plan plan.json --width-plan width_plan.json --out pruned"
    return f"layerfold prune {model}--plan plan.json --out pruned"
