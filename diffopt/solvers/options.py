"""``solver_args`` as cvxpylayers users write them, and the backend that honours each key.

cvxpylayers hands ``solver_args`` to diffcp, which solves with SCS unless ``solve_method`` names
ECOS or Clarabel; its users write SCS's and diffcp's keys. The table below is the one place
where those keys get their diffopt meaning. After it, every key is diffopt's common vocabulary
(``tol``, ``max_iters``, ``verbose``, ``n_jobs``, which every backend maps to its own
settings) or one backend's own setting (``Backend.accepted_options``), passed through to it.

Examples:
    >>> translate({"eps": 1e-8, "solve_method": "SCS", "acceleration_lookback": 0})
    {'tol': 1e-08, 'solver': 'SCS', 'acceleration_lookback': 0}
"""

from __future__ import annotations

from diffopt.cones import ConeDims
from diffopt.errors import InputError, ProblemError
from diffopt.solvers import BACKENDS, get_backend
from diffopt.solvers.base import Backend

#: cvxpylayers' (diffcp's) ``solver_args`` keys → diffopt's key of the same meaning.
RENAMED = {
    "eps": "tol",  # diffcp sets SCS's eps_abs = eps_rel = eps; tol does that on SCS
    "solve_method": "solver",  # "SCS", "ECOS", "Clarabel": backend names, case-insensitive
    "n_jobs_forward": "n_jobs",  # threads solving the items
}
#: diffcp keys without a diffopt counterpart → what to do instead (None: accepted, no effect).
NO_COUNTERPART = {
    # diffopt's derivative is one batched solve; there are no per-item backward threads.
    "n_jobs_backward": None,
    "mode": ("diffopt's derivative solves the KKT system exactly; choose its factorization "
             "with kkt='dense' or kkt='sparse', or a surrogate for LPs with gradient=LPGD(tau) "
             "(diffcp's mode='lpgd')"),
}
#: cvxpylayers' solver names (``CvxpyLayer(solver=...)``) → diffopt's.
SOLVER_NAMES = {
    "diffcp": "auto",  # cvxpylayers' default; solve_method="SCS" asks for SCS itself
    "moreau": "auto",  # a batched interior-point method on the tensors' device, like "native"
    "cuclarabel": "clarabel",  # Clarabel on the GPU; diffopt's runs on the CPU
}


def translate(solver_args: dict) -> dict:
    """``solver_args`` with cvxpylayers' (diffcp's) keys replaced by diffopt's.

    Raises:
        InputError: a key and its diffopt name given with different values, or a diffcp key
            that diffopt cannot honour.
    """
    out: dict = {}
    origin: dict = {}
    for key, val in solver_args.items():
        if key in NO_COUNTERPART:
            if NO_COUNTERPART[key] is None:
                continue
            raise InputError(f"solver_args key {key!r} (diffcp's) has no counterpart in "
                             f"diffopt: {NO_COUNTERPART[key]}")
        new = RENAMED.get(key, key)
        if new in out and out[new] != val:
            first = origin[new]
            raise InputError(
                f"solver_args {first!r}={out[new]!r} and {key!r}={val!r} set the same option "
                f"(cvxpylayers' {[k for k, v in RENAMED.items() if v == new][0]!r} is diffopt's "
                f"{new!r}); pass one of them"
            )
        out[new], origin[new] = val, key
    return out


def select_backend(name: str, dims: ConeDims, quadratic: bool, keys=()) -> Backend:
    """The backend called ``name`` (a diffopt or cvxpylayers name, or ``"auto"``), checked
    against the program and against the option ``keys`` it will receive.

    Under ``"auto"``, a key that only some backends honour (an SCS setting such as
    ``acceleration_lookback``) picks the first of them that supports the program, as the key
    asks for that solver. A backend named explicitly that cannot honour a key is an error naming
    those that can. Keys that no backend knows are left to the backend to reject.

    Raises:
        ProblemError: the backend cannot solve the program's cones or objective.
        InputError: a key that the backend cannot honour.
    """
    if isinstance(name, str):
        name = SOLVER_NAMES.get(name.lower(), name)
    backend = get_backend(name, dims, quadratic)
    why = backend.supports(dims, quadratic)
    if why is not None:
        raise ProblemError(f"{why}; choose another solver (e.g. solver='clarabel')")
    owners = {key: [n for n, cls in BACKENDS.items() if key in cls().accepted_options()]
              for key in keys}
    owners = {key: names for key, names in owners.items() if names}
    foreign = [key for key in owners if key not in backend.accepted_options()]
    if not foreign:
        return backend
    if name.lower() == "auto":
        for cls in BACKENDS.values():
            other = cls()
            if (other.supports(dims, quadratic) is None
                    and all(key in other.accepted_options() for key in owners)):
                return other
    which = "; ".join(f"{key!r} is a setting of {owners[key]}" for key in foreign)
    chosen = ("no solver that can solve this problem honours all of these keys"
              if name.lower() == "auto" else f"solver {backend.name!r} cannot honour it")
    raise InputError(
        f"solver_args: {which}, and {chosen}. Pass solver=... (or solve_method=...) naming one of "
        f"them, or remove the key; 'tol', 'max_iters' and 'verbose' work with every solver"
    )
