"""Where the team's shared data lives, and the marks that skip a test when it is absent."""

from __future__ import annotations

from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
GIBLEED = DATA / "eunomia_gibleed"
SYNTHEA = DATA / "synthea27nj_cdm54"


def needs(folder: Path) -> pytest.MarkDecorator:
    """Skip with a clear reason when `folder` (team data, not in a user's clone) is absent."""
    return pytest.mark.skipif(not folder.is_dir(),
                              reason=f"{folder} is absent (shared team data not here)")


needs_gibleed = [pytest.mark.shared_data, needs(GIBLEED)]
needs_synthea = [pytest.mark.shared_data, needs(SYNTHEA)]
