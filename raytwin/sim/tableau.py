"""Explicit Runge-Kutta methods as data: a Butcher tableau is an immutable solver object.

``Model(solver=TSIT5)`` (or ``dataclasses.replace(model, solver=TSIT5)`` for one sweep) integrates
every fixed step of ``dt`` with that tableau instead of the built-in RK4 (`raytwin.sim.model.rk4_step`,
which stays the default and the bit-for-bit reference of every existing result). The tableau's
stages are evaluated elementwise on tuples of arrays, like `rk4_step`, so XLA fuses a whole step
into one loop and the fused GPU kernel (`sweeps.fused`) keeps every stage in registers.

`TSIT5` is Tsitouras' 5(4) pair (Ch. Tsitouras, "Runge-Kutta pairs of order 5(4) satisfying only the
first column simplifying assumption", Computers & Mathematics with Applications 62 (2011) 770-775),
with the coefficients as published there and used by OrdinaryDiffEq's ``Tsit5``, DiffEqGPU's
``GPUTsit5`` and diffrax's ``Tsit5``; at a fixed step only its fifth-order solution is needed (six
derivative evaluations per step: the seventh stage is the next step's first). Fixed steps skip the
RK4 stability check (`raytwin.sim.checks.check_step` covers RK4 only), so pick ``dt`` well inside the
method's stability region; the divergence flag of sweeps still marks scenarios that blow up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from raytwin.sim.model import Arrays, Model

ROW_SUM_TOLERANCE = 1e-12
"""How far a row sum of ``a`` may be from its ``c`` (the coefficients are rounded decimals)."""


@dataclass(frozen=True)
class ExplicitRK:
    """An explicit Runge-Kutta method: strictly lower-triangular ``a`` (row i: the i coefficients of
    stage i+1), weights ``b`` and nodes ``c`` (one per stage), its ``order`` and a ``name``.

    Checked on construction: shapes, ``c[i] == sum(a[i])`` and ``sum(b) == 1`` (consistency), so a
    mistyped coefficient fails at import rather than as a silently wrong trajectory.
    """

    name: str
    order: int
    a: tuple[tuple[float, ...], ...]
    b: tuple[float, ...]
    c: tuple[float, ...]

    def __post_init__(self) -> None:
        stages = len(self.b)
        if len(self.c) != stages or len(self.a) != stages - 1:
            raise ValueError(f"tableau {self.name}: {stages} weights need {stages} nodes and {stages - 1} rows of a")
        if self.c[0] != 0.0:
            raise ValueError(f"tableau {self.name}: an explicit method starts at c[0] = 0")
        for i, row in enumerate(self.a, start=1):
            if len(row) != i:
                raise ValueError(f"tableau {self.name}: row {i} of a needs {i} coefficients, got {len(row)}")
            if abs(math.fsum(row) - self.c[i]) > ROW_SUM_TOLERANCE:
                raise ValueError(f"tableau {self.name}: row {i} of a sums to {math.fsum(row)!r}, not c[{i}] = "
                                 f"{self.c[i]!r}")
        if abs(math.fsum(self.b) - 1.0) > ROW_SUM_TOLERANCE:
            raise ValueError(f"tableau {self.name}: weights sum to {math.fsum(self.b)!r}, not 1")
        if self.order < 1:
            raise ValueError(f"tableau {self.name}: order must be >= 1")

    @property
    def stages(self) -> int:
        return len(self.b)

    def advance(self, model: Model, x: Arrays, u: Arrays, c: Arrays, dt: Any) -> Arrays:
        """The state after one step of `dt` from `x` with inputs `u` held (the `Solver` protocol;
        the model's `update` and `project` follow in `raytwin.sim.model.model_step`)."""
        f = model.derivative
        k = [f(x, u, c)]
        for row in self.a:
            stage = tuple(xi + dt * _combination(row, [kj[n] for kj in k]) for n, xi in enumerate(x))
            k.append(f(stage, u, c))
        return tuple(xi + dt * _combination(self.b, [kj[n] for kj in k]) for n, xi in enumerate(x))


def _combination(weights: tuple[float, ...], terms: list) -> Any:
    """``sum(w * t)`` over the nonzero weights, in stage order."""
    total = None
    for w, t in zip(weights, terms, strict=True):
        if w == 0.0:
            continue
        term = t if w == 1.0 else w * t
        total = term if total is None else total + term
    return 0.0 if total is None else total


RK4 = ExplicitRK(
    name="rk4", order=4,
    a=((0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)),
    b=(1 / 6, 1 / 3, 1 / 3, 1 / 6),
    c=(0.0, 0.5, 0.5, 1.0),
)
"""The classic RK4 as a tableau (the built-in default, `rk4_step`, is the same method with its own
summation order: results agree within rounding, not bit for bit)."""

TSIT5 = ExplicitRK(
    name="tsit5", order=5,
    a=(
        (0.161,),
        (-0.008480655492356988544426874250230774675121177393430391537369234245294192976164141156943,
         0.3354806554923569885444268742502307746751211773934303915373692342452941929761641411569),
        (2.897153057105493432130432594192938764924887287701866490314866693455023795137503079289,
         -6.359448489975074843148159912383825625952700647415626703305928850207288721235210244366,
         4.362295432869581411017727318190886861027813359713760212991062156752264926097707165077),
        (5.325864828439256604428877920840511317836476253097040101202360397727981648835607691791,
         -11.74888356406282787774717033978577296188744178259862899288666928009020615663593781589,
         7.495539342889836208304604784564358155658679161518186721010132816213648793440552049753,
         -0.09249506636175524925650207933207191611349983406029535244034750452930469056411389539635),
        (5.861455442946420028659251486982647890394337666164814434818157239052507339770711679748,
         -12.92096931784710929170611868178335939541780751955743459166312250439928519268343184452,
         8.159367898576158643180400794539253485181918321135053305748355423955009222648673734986,
         -0.07158497328140099722453054252582973869127213147363544882721139659546372402303777878835,
         -0.02826905039406838290900305721271224146717633626879770007617876201276764571291579142206),
    ),
    b=(0.09646076681806522951816731316512876333711995238157997181903319145764851595234062815396,
       0.01,
       0.4798896504144995747752495322905965199130404621990332488332634944254542060153074523509,
       1.379008574103741893192274821856872770756462643091360525934940067397245698027561293331,
       -3.290069515436080679901047585711363850115683290894936158531296799594813811049925401677,
       2.324710524099773982415355918398765796109060233222962411944060046314465391054716027841),
    c=(0.0, 0.161, 0.327, 0.9, 0.9800255409045096857298102862870245954942137979563024768854764293221195950761080302604,
       1.0),
)
"""Tsitouras 5(4), fifth-order solution (FSAL: its seventh stage is the next step's first)."""

TABLEAUS = {t.name: t for t in (RK4, TSIT5)}
