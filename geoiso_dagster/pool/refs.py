"""Task references: what names the function a worker runs.

A reference is "package.module:function" (any importable module, such as a team's own
steps) or the bare name of a built-in task ("ingest", "inspect", ...). References are
fixed in code, when the definitions are built: run config never chooses one (a field
that did would let whoever launches a run make the workers import any module).
"""

import re

# Dotted module path, then one public function name: no attribute chains, no private
# names, nothing but identifiers.
_REF = re.compile(r"(?:[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*:)?[A-Za-z][A-Za-z0-9_]*")


def check_task_ref(ref: str) -> str:
    """`ref` itself when it is a well-formed task reference; ValueError naming it if not."""
    if not isinstance(ref, str) or not _REF.fullmatch(ref):
        raise ValueError(
            f"bad task reference {ref!r}: expected 'package.module:function' (a public "
            "function of an importable module) or the name of a built-in task"
        )
    return ref


def is_qualified(ref: str) -> bool:
    """Whether `ref` names its module ("package.module:function")."""
    return ":" in ref
