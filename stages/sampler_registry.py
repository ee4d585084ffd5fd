"""The samplers generate can run: name, function, network evaluations per image, whether churn applies, help.

Torch-free, so the configuration schema can offer the names without loading torch; the function is named by
its attribute in `stages.samplers` and imported when a sampler runs. Adding a sampler is one `SamplerEntry`
here (the contract tests in tests/stages/test_sampler_contract.py then run over it).
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from stores.errors import UserError


@dataclass(frozen=True)
class SamplerEntry:
    name: str
    function_name: str                 # attribute of stages.samplers
    evaluations: Callable[[int], int]  # network evaluations per image for `steps` sampler steps
    takes_churn: bool                  # accepts S_churn (and noise_fn)
    help: str                          # one short phrase
    min_steps: int = 2                 # fewest steps it runs (EDM's discretisation needs two noise levels)

    def function(self) -> Callable:
        """The sampler function (imports stages.samplers, hence torch)."""
        return getattr(importlib.import_module("stages.samplers"), self.function_name)

    def nfe(self, steps: int) -> int:
        return self.evaluations(steps)

    def steps_for_nfe(self, nfe: int) -> int | None:
        """The steps that make exactly `nfe` network evaluations; None when no step count does."""
        return next((s for s in range(self.min_steps, nfe + 1) if self.evaluations(s) == nfe), None)

    def help_line(self) -> str:
        return f"{self.name} ({self.help})"


SAMPLERS: dict[str, SamplerEntry] = {e.name: e for e in (
    # Heun's last step is an Euler step: two evaluations per step but the last
    SamplerEntry("heun", "edm_heun_sampler", lambda steps: 2 * steps - 1, True,
                 "EDM's second-order Algorithm 2: 2*steps-1 network evaluations"),
    SamplerEntry("euler", "edm_euler_sampler", lambda steps: steps, True,
                 "first order on the same noise levels: steps evaluations"),
    SamplerEntry("dpm-solver", "dpm_solver_sampler", lambda steps: steps, False,
                 "DPM-Solver++ 2M via diffusers, no churn: steps evaluations"),
    SamplerEntry("dpm-solver-3m", "dpm_solver_3m_sampler", lambda steps: steps, False,
                 "DPM-Solver++ 3M via diffusers, no churn, steps >= 3: steps evaluations", min_steps=3),
    SamplerEntry("ipndm", "ipndm_sampler", lambda steps: steps, False,
                 "iPNDM (4th-order multistep, Zhang & Chen 2023), no churn: steps evaluations"),
)}


def sampler_help() -> str:
    return " | ".join(entry.help_line() for entry in SAMPLERS.values())


def sampler_entry(name: str) -> SamplerEntry:
    """The registered sampler `name`; UserError naming the known ones otherwise."""
    if name not in SAMPLERS:
        raise UserError(f"unknown sampler {name!r}; choose one of: {', '.join(SAMPLERS)}")
    return SAMPLERS[name]
