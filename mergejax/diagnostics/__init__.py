"""Merge diagnostics: what explains a merge besides its accuracy (issue 19).

Every diagnostic is a pure function returning `Section`s (numbers + matplotlib figures);
`write_sections` writes them into a workdir, `write_report` lays them out in report.md.
"""

from mergejax.diagnostics.curves import Curve, barrier, interpolation_curve
from mergejax.diagnostics.matching import matching_sections
from mergejax.diagnostics.report import enabled, settings, write_report, write_sections
from mergejax.diagnostics.section import Section
from mergejax.diagnostics.sweeps import sweep_section
from mergejax.diagnostics.weight_space import (
    cosine_matrix,
    sign_conflicts,
    tall_shares,
    task_vector_section,
    task_vector_stats,
)

__all__ = ["Section", "enabled", "settings", "write_report", "write_sections",
           "cosine_matrix", "sign_conflicts", "tall_shares", "task_vector_section",
           "task_vector_stats", "sweep_section", "Curve", "barrier", "interpolation_curve",
           "matching_sections"]
