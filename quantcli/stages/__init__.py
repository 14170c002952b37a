"""Library API: each stage's `run(...)` takes typed arguments and returns a StageResult.

from quantcli import stages
stages.capture.run("recipe.yaml", "w/captured")
stages.prepare.run("w/captured", "w/prepared")
"""

from quantcli.stages import calibrate, capture, convert, export, prepare, train  # noqa: F401
from quantcli.stages.base import StageResult  # noqa: F401
