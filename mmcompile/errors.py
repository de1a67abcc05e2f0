"""Exceptions raised by mmcompile.

Every error a user can cause (bad model file, unknown pass, wrong input) is an
:class:`MMCompileError` subclass with a message that names the model, node, pass or input at
fault. The CLI turns these into a one-line message and a non-zero exit code; anything else that
escapes is a bug in mmcompile.
"""

from __future__ import annotations

from collections.abc import Sequence


class MMCompileError(Exception):
    """Base class of all mmcompile errors. ``exit_code`` is what the CLI exits with."""

    exit_code = 1


class ModelLoadError(MMCompileError):
    """A model file is missing, is not ONNX / torch.export, or fails ``onnx.checker``."""


class ExportError(MMCompileError):
    """``torch.onnx.export`` could not turn a module into ONNX."""


class ModalityError(MMCompileError):
    """A modality mapping names an input the model does not have, or an unknown modality."""


class VerificationError(MMCompileError):
    """A graph is malformed: cycle, tensor produced twice, dangling input, bad shapes/dtypes."""

    def __init__(self, message: str, node: str | None = None):
        super().__init__(message)
        self.node = node


class PipelineError(MMCompileError):
    """A pipeline is malformed: unknown pass or option, bad syntax, cyclic requirements."""


class RegistryError(MMCompileError):
    """Two passes or targets registered under one name."""


class PassError(MMCompileError):
    """A pass failed. Names the pass, the passes that ran before it and, if known, the node."""

    def __init__(self, pass_name: str, previous: Sequence[str], message: str,
                 node: str | None = None):
        where = f" at node '{node}'" if node else ""
        before = ", ".join(previous) if previous else "none"
        super().__init__(f"error in pass '{pass_name}'{where} (after passes [{before}]): {message}")
        self.pass_name = pass_name
        self.previous = tuple(previous)
        self.node = node


class UnsupportedOpError(MMCompileError):
    """An operator no pass or target can handle. Names the op, the node and who rejected it."""

    def __init__(self, op_type: str, node: str, rejected_by: str, detail: str = ""):
        msg = f"unsupported op '{op_type}' at node '{node}' (rejected by {rejected_by})"
        super().__init__(msg + (f": {detail}" if detail else ""))
        self.op_type = op_type
        self.node = node
        self.rejected_by = rejected_by


class InputError(MMCompileError):
    """Inputs given to a model do not match its signature (name, rank, shape, dtype, range)."""
