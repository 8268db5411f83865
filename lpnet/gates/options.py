"""What a plan or a training run can be told: each option's default, bounds and description, once.

The planner's `PlanOptions`, the train mode's `TrainPruneConfig` and the allocation band's
`AllocationPolicy` declare their fields from the specs here (`OptionSpec.field`), and check them
with `check_options`. The REST API's plan request and the `lpnet plan` and `lpnet train` commands
derive their fields and flags from the same specs, so a default, a bound or a description changes in
one place. The module imports neither torch nor the rest of the package: command lines and request
schemas read it without loading either.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from enum import Enum, StrEnum
from typing import Any, Generic, Literal, TypeVar, cast

from lpnet.errors import InvalidPlanOptions

T = TypeVar("T")

# The key of an `OptionSpec` in the metadata of the dataclass field it declares.
SPEC_KEY = "lpnet.option"


@dataclass(frozen=True)
class OptionSpec(Generic[T]):
    """One option: its name, default, description and the bounds of a numeric value.

    Attributes:
        name: the field's name, in Python, in JSON and (dashed) on the command line.
        default: the value when none is given.
        description: what the option does, in a sentence or two (REST and command-line help).
        ge, gt, le, lt: bounds of a numeric value (None: unbounded on that side); a bounded value
            must also be finite.
        nullable: whether None is a value (its meaning is in the description).
        kind: the type of a value, for an option whose default is None (else the default's type).
    """

    name: str
    default: T
    description: str
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    nullable: bool = False
    kind: type | None = None

    @property
    def value_type(self) -> type:
        """The type of a value (`int`, `float`, an enum, ...)."""
        return self.kind if self.kind is not None else type(self.default)

    def field(self) -> T:
        """A dataclass field with this default, carrying this spec for `check_options`."""
        return cast(T, dataclasses.field(default=self.default, metadata={SPEC_KEY: self}))

    @property
    def bounded(self) -> bool:
        return any(bound is not None for bound in (self.ge, self.gt, self.le, self.lt))

    def span(self) -> str:
        """The bounds in words: "at least 1", "in (0, 1]", ..."""
        low = self.ge if self.ge is not None else self.gt
        high = self.le if self.le is not None else self.lt
        if low is not None and high is not None:
            opening = "[" if self.ge is not None else "("
            closing = "]" if self.le is not None else ")"
            return f"in {opening}{low:g}, {high:g}{closing}"
        if low is not None:
            return f"at least {low:g}" if self.ge is not None else f"greater than {low:g}"
        if high is not None:
            return f"at most {high:g}" if self.le is not None else f"less than {high:g}"
        return "any value"

    def problem(self, value: object) -> str | None:
        """What is wrong with `value` ("must be in (0, 1]"), or None when it is a valid value."""
        if value is None:
            return None if self.nullable else "must be given"
        kind = self.value_type
        if issubclass(kind, Enum):
            values = [member.value for member in kind]
            return None if value in values else f"must be one of {', '.join(map(str, values))}"
        if not self.bounded:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            return f"must be a number {self.span()}"
        number = float(value)
        inside = (
            (self.ge is None or number >= self.ge)
            and (self.gt is None or number > self.gt)
            and (self.le is None or number <= self.le)
            and (self.lt is None or number < self.lt)
        )
        if not math.isfinite(number):
            return f"must be {self.span()} and finite"
        return None if inside else f"must be {self.span()}"

    def check(self, value: object) -> None:
        """Raises InvalidPlanOptions naming the option when `value` is not valid."""
        problem = self.problem(value)
        if problem is not None:
            raise InvalidPlanOptions(f"{self.name} {problem}, got {value}", {self.name: value})


def option_specs(options: Any) -> list[OptionSpec[Any]]:
    """The specs of the fields of a dataclass (or an instance of one) declared from a spec."""
    return [f.metadata[SPEC_KEY] for f in dataclasses.fields(options) if SPEC_KEY in f.metadata]


def check_options(options: Any) -> None:
    """Check every field of a dataclass instance declared from a spec.

    Raises:
        InvalidPlanOptions: the first field whose value is outside its spec's bounds.
    """
    for spec in option_specs(options):
        spec.check(getattr(options, spec.name))


class PlanMode(StrEnum):
    """How a plan is made (see `lpnet.gates.planner`)."""

    ARCHITECTURE_ONLY = "architecture-only"
    WEIGHTS = "weights"
    TRAIN = "train"

    @classmethod
    def named(cls, name: str) -> PlanMode:
        """The mode called `name`: its value, or its name in a plan request (`ModeName`).

        Raises:
            InvalidPlanOptions: no mode has that name (the message lists the modes `plan` runs; the
                train mode has an entry point of its own).
        """
        try:
            return cls(_REQUEST_ALIASES.get(name, name))
        except ValueError:
            known = ", ".join(mode.value for mode in cls if mode is not cls.TRAIN)
            raise InvalidPlanOptions(
                f"unknown plan mode {name!r}; use one of {known}", {"mode": name}
            ) from None


ModeName = Literal["architecture", "weights"]
"""A mode as plan requests name it (the REST API, `lpnet plan`): `architecture` is `architecture-only`.

The train mode is not among them: it trains on a dataset, which a plan request cannot carry (`lpnet
train` and `lpnet.gates.training` run it)."""
_REQUEST_ALIASES = {"architecture": PlanMode.ARCHITECTURE_ONLY.value}


class Allocation(StrEnum):
    """How the train mode decides each group's kept count (see `lpnet.gates.training`)."""

    PLANNED = "planned"
    JOINT = "joint"


class FilterChoice(StrEnum):
    """Which filters a weights-mode plan keeps in each group (see `lpnet.gates.planner`)."""

    L1 = "l1"
    GATES = "gates"


# The width grid and the allocation band (`lpnet.gates.budget`, `lpnet.gates.allocation`).
ROUND_TO = OptionSpec(
    "round_to", 8, "Kept channels are multiples of this (and of each group's divisor).", ge=1, le=256
)
MAX_SKEW = OptionSpec[float | None](
    "max_skew",
    1.25,
    "Allocation band: each group's keep ratio stays within this factor of the uniform keep ratio that "
    "meets the budget, and its pruned share within this factor of the uniform pruned share (1: uniform "
    "widths; null: no band around the uniform ratio, only the minimum). A plan that cannot meet the "
    "budget inside the band says so in its warnings.",
    ge=1,
    nullable=True,
)
MIN_KEEP_RATIO = OptionSpec(
    "min_keep_ratio",
    0.25,
    "Least share of its channels any group keeps, unless the budget needs a uniform keep ratio under it "
    "(the plan then warns).",
    gt=0,
    le=1,
)

# Verification: plan, measure, re-plan (`lpnet.gates.planner.verification_loop`).
MAX_ROUNDS = OptionSpec("max_rounds", 5, "Plan-and-measure rounds when plans are measured.")
VERIFY_MARGIN = OptionSpec(
    "verify_margin",
    0.04,
    "Verified plans aim at measuring budget * (1 - margin), so timing noise does not put them over it.",
)
VERIFY_TIMINGS = OptionSpec(
    "verify_timings",
    2,
    "A plan whose first timing is at or under the budget is timed this many times in all and judged on "
    "the median.",
    ge=1,
)
ACCEPT_BAND = OptionSpec(
    "accept_band", 0.10, "A round measuring within this share under the budget ends verification."
)
SAFETY_MARGIN = OptionSpec(
    "safety_margin",
    0.0,
    "Plan for budget * (1 - margin) from the first round (0: rely on verification).",
    ge=0,
    lt=1,
)
SEED = OptionSpec("seed", 0, "Random seed.")
FILTERS = OptionSpec(
    "filters",
    FilterChoice.L1,
    "Which filters a weights-mode plan keeps in each group, at the widths its W-Gates chose: l1, the "
    "largest by L1 norm (as the architecture mode keeps); gates, the highest W-Gate scores.",
)

# The train mode (`lpnet.gates.training`).
ALLOCATION = OptionSpec(
    "allocation",
    Allocation.PLANNED,
    "How each group's kept count is decided: planned, by the architecture-only plan for the budget "
    "(verified before training when plans are measured); joint, learnt by the gates in joint training.",
)
GATE_EPOCHS = OptionSpec("gate_epochs", 5, "Epochs of joint training of the weights and the gates.", ge=1)
FINETUNE_EPOCHS = OptionSpec("finetune_epochs", 5, "Epochs of fine-tuning after physical pruning.", ge=0)
TRAIN_LEARNING_RATE = OptionSpec(
    "learning_rate",
    0.05,
    "SGD learning rate of the weights (momentum 0.9), cosine-decayed over joint training and "
    "fine-tuning as one schedule.",
    gt=0,
)
MAX_BATCHES = OptionSpec[int | None](
    "max_batches",
    None,
    "At most this many batches per epoch (null: every batch).",
    ge=1,
    nullable=True,
    kind=int,
)
