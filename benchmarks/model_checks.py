"""What the checks at registration cost: the RK4 stability check above all (issue 12, section 6).

Registering an artifact runs `check_model` once per model and process (names, shapes, units,
finite probes at the corners of the parameter box, jit / vmap / jacfwd, and the stability limits
from the Jacobian's eigenvalues at the defaults and the corners), then checks the artifact's own
parameter values against the model's default step (`check_step`, one Jacobian). Per reference
model this measures, in the same run:

- `check_model` from cold (its caches cleared, so the Jacobian kernel is traced and compiled again);
- the stability limits alone, warm: default parameters plus every corner of the box (`stability_limits`);
- the per-artifact stability check (`check_step`) at fresh parameter values (nothing cached), against
  the whole `ModelRegistry.register` call it is part of (same values, local registry).
"""

from __future__ import annotations

import itertools
import tempfile

import numpy as np

from benchmarks.harness import BenchContext, BenchResult, Figure, benchmark
from raytwin.contracts import AssetType
from raytwin.registry import ModelRegistry
from raytwin.sim import BATTERY_ECM, THERMAL_RC, TWO_TANK, Model, checks


def _fresh_params(model: Model, counter: itertools.count) -> dict[str, float]:
    """Default values nudged by a new factor each call: no cache ever holds them."""
    factor = 1.0 + 1e-6 * next(counter)
    return {p.name: min(p.default * factor, p.upper) for p in model.params}


def _cold_check(model: Model) -> None:
    checks.clear_caches()
    checks.check_model(model)


@benchmark("model-checks", "Checks at registration: check_model from cold, stability limits, per-artifact step check")
def model_checks(ctx: BenchContext) -> BenchResult:
    models = [THERMAL_RC] if ctx.quick else [THERMAL_RC, BATTERY_ECM, TWO_TANK]
    repeat = 1 if ctx.quick else max(ctx.repeat, 3)
    res = BenchResult()
    counter = itertools.count(1)
    with tempfile.TemporaryDirectory() as root:
        registry = ModelRegistry(root)
        for model in models:
            asset_type = AssetType.from_model(model)
            cold, _ = ctx.measure(f"model-checks/cold/{model.name}", lambda m=model: _cold_check(m),
                                       warmup=0, repeat=repeat)
            corners = checks.box_corners([p.lower for p in model.params], [p.upper for p in model.params])
            rows = np.concatenate([np.asarray(model.param_vector())[None, :], corners])
            limits, values = ctx.measure(f"model-checks/limits/{model.name}",
                                         lambda m=model, r=rows: checks.stability_limits(m, r), repeat=repeat)
            res.checks[f"{model.name}/limits"] = {"default_s": float(values[0]), "box_min_s": float(np.nanmin(values)),
                                                  "corners": len(corners)}
            step, _ = ctx.measure(f"model-checks/step/{model.name}", lambda m=model: checks.check_step(
                m, m.default_dt, list(_fresh_params(m, counter).values())), warmup=1, repeat=repeat)
            versions = (f"1.0.{k}" for k in itertools.count())
            whole, _ = ctx.measure(f"model-checks/register/{model.name}", lambda m=model, t=asset_type: registry.register(
                m.name, next(versions), t, _fresh_params(m, counter)), warmup=1, repeat=repeat)
            res.timings.update({f"{model.name}/{label}": t for label, t in
                                (("check_model_cold", cold), ("stability_limits", limits), ("check_step", step),
                                 ("register", whole))})
            res.figures += [
                Figure(f"{model.name}: check_model from cold (JIT included)", cold.median_s * 1e3, "ms"),
                Figure(f"{model.name}: stability limits at defaults + {len(corners)} corners, warm",
                       limits.median_s * 1e3, "ms"),
                Figure(f"{model.name}: per-artifact stability check (new parameter values)", step.median_s * 1e3, "ms",
                       "the whole ModelRegistry.register call", whole.median_s * 1e3,
                       note="ratio: the check's share of a registration"),
            ]
    res.notes.append("caches cleared before each cold check_model; fresh parameter values for every step check "
                     "and registration; local-disk registry")
    return res
