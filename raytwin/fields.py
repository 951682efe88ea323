"""The field types every contract shares: a frozen, closed base model, finite numbers, known units.

They live apart from `raytwin.contracts` so that contracts built from them in other core modules
(`raytwin.signals`, the scenario inputs) can be imported by `raytwin.contracts` itself.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StrictFloat, StrictInt

from raytwin import units


class Contract(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


JSON_KINDS = {bool: "a boolean", str: "a string", type(None): "null", list: "a list", dict: "an object"}
"""What a JSON value that is no number is, in the words of JSON (a refusal names it, never echoes it)."""


def _fits_float(value: Any) -> Any:
    """Refuse what is no number with one reason (the union below would give one per member, ``value.float: ...;
    value.int: ...``), and an integer beyond a 64-bit float's range (a JSON number of 400 digits) as invalid input:
    the finiteness check and `float()` would raise OverflowError, which pydantic lets escape."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"expected a number, not {JSON_KINDS.get(type(value), type(value).__name__)}")
    if type(value) is int:
        try:
            float(value)
        except OverflowError:
            raise ValueError("number too large for a 64-bit float") from None
    return value


Finite = Annotated[StrictFloat | StrictInt, BeforeValidator(_fits_float), Field(allow_inf_nan=False),
                   AfterValidator(float)]
"""A finite number (JSON integers included), as a float; booleans and numeric strings are refused."""


def _known_unit(unit: str) -> str:
    units.canonical(unit)  # raises UnitError (a ValueError) with the list of known units
    return unit


Unit = Annotated[str, AfterValidator(_known_unit)]


