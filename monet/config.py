"""Every knob of monet in one place."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Config:
    """Settings of one ``monet.optimize`` call."""

    time_limit: float = 20.0
    """Seconds the solver may spend on one schedule; the best found is used after that."""
    profile_repeats: int = 3
    """Timed runs per operator (median); each op also runs once before, warm."""
    profile_cache: str | None = None
    """Path of the on-disk profile cache; None for ``$MONET_CACHE_DIR`` or ``~/.cache/monet``."""
    measure: bool = True
    """Measure eager and optimised peak memory and step time when planning (for ``report()``)."""
    timing_repeats: int = 3
    """Interleaved step-time samples per method when measuring (median reported)."""
    replan_attempts: int = 2
    """If a measured peak exceeds the budget, re-solve this many times with the excess taken off."""
    progress: bool = False
    """Show progress bars and solver progress on stderr."""
    variants: bool = True
    """Let the solver choose operator implementations (``monet.operators``) with the schedule."""
    lossy_variants: bool = False
    """Also offer variants that change results beyond float rounding (none are on by default)."""
    kernel_variants: bool = False
    """Also offer other kernels for forward ops (e.g. convolution without oneDNN): their
    rounding differs from eager's, which can flip a max-pool's argmax downstream."""
    attention_variants: bool = True
    """Offer the chunked written-out attention (``monet.operators.attention``): on MViTv2-T
    it lowers the least peak (0.44 of eager's against 0.47) and, measured over eleven
    rounds, is no slower than checkpointing alone (the README's limits)."""
    check_simulation: bool = True
    """Simulate the lowered graphs and require the solver's predicted peak exactly."""
