"""Profiles: `quick` (the default on a CPU) shrinks calibration so a cell finishes in minutes on two
cores and scores WikiText-2 on the first 40 windows; `paper` keeps each method's paper settings."""
from __future__ import annotations

from dataclasses import fields

from .errors import SlmquantError
from .methods import get_method

# Calibration budget of the quick profile, applied to the fields a method's config has.
QUICK = {"calib_samples": 32, "calib_seqlen": 2048}


def profile_settings(method: str, profile: str) -> dict:
    if profile not in ("quick", "paper"):
        raise SlmquantError(f"profile {profile!r}: choose quick or paper")
    if profile == "paper":
        return {}
    names = {f.name for f in fields(get_method(method).config)}
    return {k: v for k, v in QUICK.items() if k in names}
