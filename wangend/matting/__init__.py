"""MatAnyone video matting: the network, its weights, and the matting run.

MattingInputs(config).resolve(spec) -> ResolvedMatAnyOne    (at submit time)
MattingRuntime(output_dir, weights, device).run(job_id, job, control, hooks)
"""

from .inputs import MattingInputs
from .runtime import MattingRuntime

__all__ = ["MattingInputs", "MattingRuntime"]
